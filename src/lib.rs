//! slotserve: object-centric image editing with SlotDiffusion models, served over HTTP.
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod device;
pub mod imageio;
pub mod model;
pub mod summary;
pub mod data;
pub mod eval;
pub mod edit;
pub mod slots;
pub mod engine;
pub mod api;
