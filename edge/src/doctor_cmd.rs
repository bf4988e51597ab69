//! `fedshield-edge doctor` (can this box train and infer?) and `rig-ping` (is the attached
//! board or rig answering?).

use anyhow::Context;
use fedshield_edge::compute::ComputeTarget;
use fedshield_edge::inference::OnnxModel;
use fedshield_edge::serial_link::SerialLink;
use fedshield_models::{Assets, fixtures};
use std::time::Duration;

pub fn doctor(root: &std::path::Path) -> anyhow::Result<()> {
    for line in crate::telemetry_cmd::summary(root) {
        println!("{line}");
    }
    let assets = Assets::locate();
    let target = ComputeTarget::detect();
    println!("compute   : {}", target.describe());

    // A real forward and backward pass on the chosen device.
    let x = tch::Tensor::randn([4, 8], (tch::Kind::Float, target.device));
    let w = tch::Tensor::randn([8, 2], (tch::Kind::Float, target.device)).set_requires_grad(true);
    let loss = x.matmul(&w).pow_tensor_scalar(2).mean(tch::Kind::Float);
    loss.backward();
    let g = w.grad().abs().sum(tch::Kind::Float).double_value(&[]);
    println!(
        "libtorch  : forward/backward ok (loss {:.4}, |grad| {:.4})",
        loss.double_value(&[]),
        g
    );

    let mut mlp = OnnxModel::load(&assets, &fixtures::tiny_mlp_onnx())?;
    let (shape, y) = mlp.run(&[1, 4], vec![1.0, 2.0, 3.0, 4.0])?;
    println!(
        "onnxrt    : {} -> shape {shape:?}, y {y:?}",
        assets.onnxruntime_dylib()?.display()
    );

    let gguf = assets.smollm2_gguf().context("model")?;
    let size = std::fs::metadata(&gguf)?.len();
    println!(
        "model     : {} ({:.1} MiB)",
        gguf.display(),
        size as f64 / (1 << 20) as f64
    );
    println!("data      : {}", assets.faq_alpaca()?.display());
    Ok(())
}

/// Pings the board or rig on `port` `count` times.
pub fn rig_ping(port: &str, baud: u32, count: u32, timeout: f64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut link = SerialLink::open(port, baud)?;
        let rig = link.identify(Duration::from_secs_f64(timeout)).await?;
        println!(
            "rig {port}: firmware {:?}, rig protocol {}, {:?}",
            rig.firmware, rig.protocol, rig.capabilities
        );
        for seq in 0..count {
            let rtt = link.ping(seq, Duration::from_secs_f64(timeout)).await?;
            println!(
                "pong {seq} from {port} in {:.2} ms",
                rtt.as_secs_f64() * 1e3
            );
        }
        Ok(())
    })
}
