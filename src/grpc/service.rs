//! The `slotserve.v1.SlotServe` calls: each reshapes its message, then runs the same code as
//! its HTTP endpoint (validation, admission, the engine) and reshapes the answer.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert;
use super::proto::slot_serve_server::SlotServe;
use super::proto::{
    DecomposeRequest, DecomposeResponse, EditRequest, EditResponse, InfoRequest, InfoResponse,
    RenderEvent, RenderRequest, RenderResponse,
};
use crate::api::decomposition::describe_all;
use crate::api::editing::EditInputs;
use crate::api::inputs::check_images;
use crate::api::rendering::{RenderInput, Rendering};
use crate::api::state::AppState;
use crate::api::ApiError;
use crate::edit::EditOp;

/// The gRPC API over the server's shared state.
#[derive(Clone)]
pub struct SlotServeService {
    state: AppState,
}

impl SlotServeService {
    /// The API over `state`.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// Validates and queues a render request.
    fn start_render(&self, req: &RenderRequest) -> Result<Rendering, ApiError> {
        let (keep, drop) = (convert::indices(&req.keep), convert::indices(&req.drop));
        let input = RenderInput { sets: &req.slots, keep: keep.as_deref(), drop: drop.as_deref() };
        let options = convert::sampling_options(req.seed, &req.sampler, req.steps);
        self.state.start_render(input, options)
    }

    /// The inputs of an edit: `images` or `slots`, not both.
    fn edit_inputs(&self, req: &mut EditRequest) -> Result<EditInputs, ApiError> {
        let max = self.state.limits().max_images;
        match (req.images.is_empty(), req.slots.is_empty()) {
            (false, true) => {
                Ok(EditInputs::Images(check_images(std::mem::take(&mut req.images), max)?))
            }
            (true, false) => Ok(EditInputs::Slots(self.state.slot_sets(&req.slots)?)),
            _ => Err(ApiError::bad_request("give either `images` or `slots`")),
        }
    }
}

/// The stream of `RenderStream`.
type RenderEvents = Pin<Box<dyn Stream<Item = Result<RenderEvent, Status>> + Send>>;

#[tonic::async_trait]
impl SlotServe for SlotServeService {
    async fn decompose(
        &self,
        request: Request<DecomposeRequest>,
    ) -> Result<Response<DecomposeResponse>, Status> {
        let req = request.into_inner();
        let images = check_images(req.images, self.state.limits().max_images)?;
        let outs = self.state.decompose_request(images).await?;
        let images = describe_all(outs, req.masks.unwrap_or(true), convert::decomposed).await?;
        Ok(Response::new(DecomposeResponse { images }))
    }

    async fn render(
        &self,
        request: Request<RenderRequest>,
    ) -> Result<Response<RenderResponse>, Status> {
        let mut rendering = self.start_render(request.get_ref())?;
        let images = rendering.outputs().await?.iter().map(convert::rendered).collect();
        let s = rendering.sampling;
        Ok(Response::new(RenderResponse {
            images,
            seed: s.seed,
            sampler: s.sampler.to_string(),
            steps: s.steps as u32,
        }))
    }

    type RenderStreamStream = RenderEvents;

    async fn render_stream(
        &self,
        request: Request<RenderRequest>,
    ) -> Result<Response<RenderEvents>, Status> {
        let rendering = self.start_render(request.get_ref())?;
        let events = rendering
            .updates()
            .map(|update| update.map(convert::render_event).map_err(Status::from));
        Ok(Response::new(Box::pin(events)))
    }

    async fn edit(&self, request: Request<EditRequest>) -> Result<Response<EditResponse>, Status> {
        let mut req = request.into_inner();
        let inputs = self.edit_inputs(&mut req)?;
        let operations = req
            .operations
            .into_iter()
            .enumerate()
            .map(|(i, op)| convert::edit_op(op).map_err(|e| e.at(format!("operation {i}"))))
            .collect::<Result<Vec<EditOp>, _>>()?;
        let options = convert::sampling_options(req.seed, &req.sampler, req.steps);
        let edited = self.state.edit(inputs, &operations, options).await?;
        Ok(Response::new(convert::edit_response(edited)))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(convert::info(self.state.info()?)))
    }
}
