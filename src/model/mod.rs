//! candle modules of the SlotDiffusion image models; tensors in, tensors out, no I/O.
pub mod encoder;
pub mod init;
pub mod pipeline;
pub mod resnet;
pub mod sampler;
pub mod slot_attention;
pub mod unet;
pub mod vit;
pub mod vit_layers;
pub mod vqvae;
