//! slotserve: object-centric image editing with SlotDiffusion models, served over HTTP.
pub mod api;
pub mod bench;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod cpu_runtime;
pub mod data;
pub mod device;
pub mod edit;
pub mod engine;
pub mod eval;
pub mod imageio;
pub mod model;
pub mod ops;
pub mod slots;
pub mod summary;
pub mod train;
