//! The two heavy runtimes of the edge really work here: libtorch (through tch) trains, and
//! ONNX Runtime (loaded at run time through ort) infers. Nothing is mocked.

use fedshield_edge::compute::ComputeTarget;
use fedshield_edge::inference::OnnxModel;
use fedshield_models::{Assets, fixtures};
use tch::{Kind, Tensor, nn, nn::OptimizerConfig};

#[test]
fn libtorch_forward_backward_matches_analytic_gradient() {
    let dev = ComputeTarget::detect().device;
    // loss = mean((x w)^2): d loss / d w = 2/n x^T (x w).
    let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])
        .reshape([3, 2])
        .to_device(dev);
    let w = Tensor::from_slice(&[0.5f32, -1.0])
        .reshape([2, 1])
        .to_device(dev)
        .set_requires_grad(true);
    let y = x.matmul(&w);
    let loss = y.pow_tensor_scalar(2).mean(Kind::Float);
    loss.backward();
    let want = x.tr().matmul(&y.detach()) * (2.0 / 3.0);
    let diff = (w.grad() - want).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "gradient off by {diff}");
    assert!((loss.double_value(&[]) - (2.25 + 6.25 + 12.25) / 3.0).abs() < 1e-5);
}

#[test]
fn libtorch_adamw_lowers_a_loss() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(ComputeTarget::detect().device);
    let lin = nn::linear(vs.root(), 4, 1, Default::default());
    let x = Tensor::randn([64, 4], (Kind::Float, vs.device()));
    let y = x.sum_dim_intlist(1, true, Kind::Float);
    let mut opt = nn::AdamW::default().build(&vs, 0.05).unwrap();
    let loss0 = (x.apply(&lin) - &y)
        .pow_tensor_scalar(2)
        .mean(Kind::Float)
        .double_value(&[]);
    for _ in 0..100 {
        let loss = (x.apply(&lin) - &y).pow_tensor_scalar(2).mean(Kind::Float);
        opt.backward_step(&loss);
    }
    let loss1 = (x.apply(&lin) - &y)
        .pow_tensor_scalar(2)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!(loss1 < loss0 * 0.01, "loss {loss0} -> {loss1}");
}

#[test]
fn onnx_runtime_runs_the_tiny_mlp() {
    let mut mlp = OnnxModel::load(&Assets::locate(), &fixtures::tiny_mlp_onnx()).unwrap();
    let (shape, y) = mlp
        .run(&[2, 4], vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 0.5])
        .unwrap();
    assert_eq!(shape, vec![2, 2]);
    // Expected values from models/scripts/make_tiny_onnx.py (numpy and onnxruntime agree).
    let want = [4.7f32, -0.525, 1.55, 0.15];
    for (g, w) in y.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{y:?}");
    }
}

#[test]
fn onnx_runtime_rejects_a_missing_model_with_a_clear_error() {
    let err = OnnxModel::load(&Assets::locate(), std::path::Path::new("/nonexistent.onnx"))
        .err()
        .expect("loading a missing file fails");
    assert!(err.to_string().contains("/nonexistent.onnx"), "{err}");
}
