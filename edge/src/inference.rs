//! On-device inference with ONNX Runtime, loaded at run time (`ort`'s `load-dynamic`): the
//! library comes from the installed `onnxruntime` wheel, or from `ORT_DYLIB_PATH`.

use crate::EdgeError;
use fedshield_models::Assets;
use ort::session::Session;
use ort::value::Tensor;
use std::path::Path;
use std::sync::OnceLock;

static ORT_ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// The process's ONNX Runtime environment, initialised from `assets` on first use.
pub fn environment(assets: &Assets) -> Result<&'static ort::environment::Environment, EdgeError> {
    ORT_ENV
        .get_or_init(|| {
            let lib = assets.onnxruntime_dylib().map_err(|e| e.to_string())?;
            ort::init_from(&lib)
                .map_err(|e| format!("loading {}: {e}", lib.display()))?
                .with_name("fedshield-edge")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EdgeError::Onnx(e.clone()))
}

/// An ONNX model with one f32 input and one f32 output.
pub struct OnnxModel {
    session: Session,
}

impl OnnxModel {
    /// Loads `path`, initialising ONNX Runtime from `assets` on first use.
    pub fn load(assets: &Assets, path: &Path) -> Result<Self, EdgeError> {
        let env = environment(assets)?;
        let session = Session::builder(env)
            .and_then(|mut b| b.commit_from_file(path))
            .map_err(|e| EdgeError::Onnx(format!("{}: {e}", path.display())))?;
        Ok(Self { session })
    }

    /// Runs the model on a row-major f32 tensor of `shape`; returns the first output's shape
    /// and data.
    pub fn run(
        &mut self,
        shape: &[usize],
        data: Vec<f32>,
    ) -> Result<(Vec<i64>, Vec<f32>), EdgeError> {
        let onnx = |e: ort::Error| EdgeError::Onnx(e.to_string());
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let input = Tensor::from_array((shape, data)).map_err(onnx)?;
        let outputs = self.session.run(ort::inputs![input]).map_err(onnx)?;
        let (shape, values) = outputs[0].try_extract_tensor::<f32>().map_err(onnx)?;
        Ok((shape.to_vec(), values.to_vec()))
    }
}
