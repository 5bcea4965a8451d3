//! `AutoencoderKL`: decoder and encoder against diffusers, weight coverage, and config
//! refusal.

use hypergen::FusedOps;
use std::path::Path;

use burn::tensor::DType;
use hypergen::load::folder::weight_files;
use hypergen::Error;

use crate::common::{
    assert_matches, fixture_dir, fixture_vae, ref_tensor, rel_error, values, TOL_F32,
};

/// Relative error allowed when the VAE runs with f16 parameters (see
/// `decode_casts_input_to_param_dtype`): far below what an overflow gives.
const TOL_F16: f64 = 5e-2;

fn decode_matches<B: FusedOps>(device: &B::Device) {
    let vae = fixture_vae::<B>(device);
    let out = vae.decode(ref_tensor::<B, 4>("vae.decode.in", device));
    assert_matches("vae.decode", out, "vae.decode.out", TOL_F32);
}
crate::on_backends!(vae_decode, decode_matches);

fn encode_matches<B: FusedOps>(device: &B::Device) {
    let vae = fixture_vae::<B>(device);
    let dist = vae.encode(ref_tensor::<B, 4>("vae.encode.in", device));
    // logvar is consistent with std by construction; check it once, loosely, so a
    // mix-up of the two halves or of the clamp cannot pass.
    let from_logvar = values((dist.logvar.clone() * 0.5).exp());
    let std = values(dist.std.clone());
    let err = rel_error(&std, &from_logvar);
    assert!(
        err <= 1e-6,
        "std = exp(0.5 * logvar): relative error {err:.3e}"
    );
    assert_matches("vae.encode mean", dist.mean, "vae.encode.mean", TOL_F32);
    assert_matches("vae.encode std", dist.std, "vae.encode.std", TOL_F32);
}
crate::on_backends!(vae_encode, encode_matches);

/// Half-precision parameters: f32 inputs are cast to the parameters' dtype (the VAE may
/// be f16 or f32 while the rest of the pipeline is the other), and GroupNorm statistics
/// do not overflow. This is a precision check, not parity (that is f32, `TOL_F32`):
/// rounding the weights to f16 alone costs 9e-4 here; f16 compute measured 2.0e-3 on the
/// CPU and 1.0e-2 on wgpu (whose f16 convolutions accumulate less precisely), while
/// GroupNorm statistics summed in f16 gave 0.76.
fn decode_casts_input_to_param_dtype<B: FusedOps>(device: &B::Device) {
    let dir = fixture_dir().join("vae");
    let vae = hypergen::load::folder::load_vae::<B>(&dir, Some("fp16"), DType::F16, device)
        .expect("load in f16")
        .0;
    assert_eq!(vae.dtype(), DType::F16);
    let latents = ref_tensor::<B, 4>("vae.decode.in", device);
    let out = vae.decode(latents);
    assert_eq!(out.dtype(), DType::F16);
    let want = crate::common::reference("vae.decode.out").shape;
    assert_eq!(out.dims().to_vec(), want);
    assert_matches("vae.decode (f16 params)", out, "vae.decode.out", TOL_F16);
}
crate::on_backends!(vae_f16_params, decode_casts_input_to_param_dtype);

/// A copy of the fixture's VAE folder in a tempdir with `edit` applied to its config;
/// weights are linked, not copied.
fn vae_with_config(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = fixture_dir().join("vae");
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(src.join("config.json")).expect("read config");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("config parses");
    edit(&mut json);
    std::fs::write(tmp.path().join("config.json"), json.to_string()).expect("write config");
    for f in weight_files(&src, "diffusion_pytorch_model", None).expect("weights") {
        let name = f.file_name().expect("file name");
        link_or_copy(&f, &tmp.path().join(name));
    }
    tmp
}

fn link_or_copy(from: &Path, to: &Path) {
    #[cfg(unix)]
    std::os::unix::fs::symlink(from, to).expect("symlink weights");
    #[cfg(not(unix))]
    std::fs::copy(from, to).map(|_| ()).expect("copy weights");
}

fn expect_unsupported(dir: &Path, needle: &str) {
    match hypergen::load::folder::load_vae::<crate::common::Cpu>(
        dir,
        None,
        DType::F32,
        &Default::default(),
    ) {
        Err(Error::Unsupported { path, message }) => {
            assert_eq!(path, dir.join("config.json"), "error names the config file");
            assert!(
                message.contains(needle),
                "message `{message}` names `{needle}`"
            );
        }
        Err(other) => panic!("expected Error::Unsupported, got {other}"),
        Ok(_) => panic!("expected Error::Unsupported, the VAE loaded"),
    }
}

#[test]
fn vae_unsupported_down_block_is_an_error() {
    let dir = vae_with_config(|c| c["down_block_types"][1] = "AttnDownEncoderBlock2D".into());
    expect_unsupported(dir.path(), "AttnDownEncoderBlock2D");
}

#[test]
fn vae_unsupported_up_block_is_an_error() {
    let dir = vae_with_config(|c| c["up_block_types"][3] = "AttnUpDecoderBlock2D".into());
    expect_unsupported(dir.path(), "AttnUpDecoderBlock2D");
}

#[test]
fn vae_unsupported_act_fn_is_an_error() {
    let dir = vae_with_config(|c| c["act_fn"] = "gelu".into());
    expect_unsupported(dir.path(), "gelu");
}

#[test]
fn vae_config_with_unaligned_groups_is_an_error() {
    let dir = vae_with_config(|c| c["norm_num_groups"] = 24.into());
    expect_unsupported(dir.path(), "norm_num_groups");
}

#[test]
fn vae_config_unmodified_copy_loads() {
    // The tempdir machinery itself must not be what makes the tests above fail.
    let dir = vae_with_config(|_| {});
    hypergen::load::folder::load_vae::<crate::common::Cpu>(
        dir.path(),
        None,
        DType::F32,
        &Default::default(),
    )
    .expect("unmodified copy loads");
}
