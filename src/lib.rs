//! slotserve: object-centric image editing with SlotDiffusion models, served over HTTP.
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod imageio;
pub mod model;
pub mod data;
pub mod eval;
pub mod edit;
pub mod slots;
pub mod engine;
