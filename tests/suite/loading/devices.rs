//! `--device` and `--dtype`: parsing, resolution on made-up machines (CUDA boxes, Macs,
//! GPU-less servers), the errors for devices that are missing or not compiled in, and
//! the command line's handling of them. Nothing here needs a GPU.

use burn::tensor::DType;
use hypergen::device::{
    resolve, Adapter, AdapterKind, CudaDevice, DeviceSpec, GraphicsApi, Inventory, ResolvedDevice,
    Target,
};

fn adapter(
    api: GraphicsApi,
    index: usize,
    kind_index: usize,
    name: &str,
    kind: AdapterKind,
    float16: bool,
) -> Adapter {
    Adapter {
        api,
        index,
        kind_index,
        name: name.into(),
        kind,
        driver: String::new(),
        float16,
        bfloat16: false,
    }
}

fn h100(index: usize) -> CudaDevice {
    CudaDevice {
        index,
        name: "NVIDIA H100 80GB HBM3".into(),
        memory_bytes: 80 << 30,
        compute_capability: (9, 0),
    }
}

/// A Linux box with an H100 (seen through Vulkan too) and Mesa's software Vulkan.
fn cuda_box(cuda_compiled: bool) -> Inventory {
    Inventory {
        wgpu_compiled: true,
        cuda_compiled,
        adapters: vec![
            adapter(
                GraphicsApi::Vulkan,
                0,
                0,
                "NVIDIA H100 80GB HBM3",
                AdapterKind::Discrete,
                true,
            ),
            adapter(
                GraphicsApi::Vulkan,
                1,
                0,
                "llvmpipe (LLVM 15.0.6, 256 bits)",
                AdapterKind::Software,
                true,
            ),
        ],
        cuda: Ok(vec![h100(0)]),
    }
}

/// This CI machine: software Vulkan only, no NVIDIA driver.
fn gpu_less() -> Inventory {
    Inventory {
        wgpu_compiled: true,
        cuda_compiled: false,
        adapters: vec![adapter(
            GraphicsApi::Vulkan,
            0,
            0,
            "llvmpipe (LLVM 15.0.6, 256 bits)",
            AdapterKind::Software,
            true,
        )],
        cuda: Err("no CUDA driver (libcuda.so.1: cannot open shared object file)".into()),
    }
}

fn spec(s: &str) -> DeviceSpec {
    s.parse()
        .unwrap_or_else(|e| panic!("`{s}` should parse: {e}"))
}

fn err(spec_str: &str, inv: &Inventory) -> String {
    resolve(&spec(spec_str), inv)
        .expect_err(&format!("`{spec_str}` should be refused"))
        .to_string()
}

#[test]
fn device_strings_parse_and_print() {
    for (s, want, shown) in [
        ("auto", DeviceSpec::Auto, "auto"),
        ("CPU", DeviceSpec::Cpu, "cpu"),
        ("wgpu", DeviceSpec::Wgpu, "wgpu"),
        ("vulkan", DeviceSpec::Vulkan(None), "vulkan"),
        ("vulkan:1", DeviceSpec::Vulkan(Some(1)), "vulkan:1"),
        ("metal", DeviceSpec::Metal(None), "metal"),
        ("mps", DeviceSpec::Metal(None), "metal"),
        ("dx12:0", DeviceSpec::Dx12(Some(0)), "dx12:0"),
        ("cuda", DeviceSpec::Cuda(0), "cuda:0"),
        (" cuda:3 ", DeviceSpec::Cuda(3), "cuda:3"),
    ] {
        assert_eq!(spec(s), want, "{s}");
        assert_eq!(want.to_string(), shown);
    }
    for bad in ["gpu", "cuda:x", "cpu:0", "vulkan:-1", "tpu:0", ""] {
        let e = bad.parse::<DeviceSpec>().expect_err(bad).to_string();
        assert!(e.contains("device"), "{bad}: {e}");
    }
}

#[test]
fn auto_prefers_cuda_then_hardware_gpus_then_cpu() {
    let r = resolve(&DeviceSpec::Auto, &cuda_box(true)).expect("auto");
    assert_eq!(r.target, Target::Cuda(h100(0)));
    assert_eq!(r.label(), "cuda:0 (NVIDIA H100 80GB HBM3)");

    // Without the cuda feature the same GPU is reached through Vulkan, and the log says
    // why CUDA was not used.
    let r = resolve(&DeviceSpec::Auto, &cuda_box(false)).expect("auto");
    assert_eq!(r.label(), "vulkan:0 (NVIDIA H100 80GB HBM3)");
    assert!(r.reason.contains("--features cuda"), "{}", r.reason);

    // Software Vulkan is not a GPU: the CPU backend is faster.
    let r = resolve(&DeviceSpec::Auto, &gpu_less()).expect("auto");
    assert_eq!(r.target, Target::Cpu);
    assert_eq!(r.label(), "cpu");
    assert!(
        r.reason.contains("llvmpipe") && r.reason.contains("software"),
        "{}",
        r.reason
    );
    assert!(r.reason.contains("no CUDA driver"), "{}", r.reason);

    // Apple silicon reports an integrated GPU through Metal: better than the CPU.
    let mac = Inventory {
        wgpu_compiled: true,
        cuda_compiled: false,
        adapters: vec![adapter(
            GraphicsApi::Metal,
            0,
            0,
            "Apple M2 Max",
            AdapterKind::Integrated,
            true,
        )],
        cuda: Err("no CUDA driver".into()),
    };
    assert_eq!(
        resolve(&DeviceSpec::Auto, &mac).expect("auto").label(),
        "metal:0 (Apple M2 Max)"
    );
    assert_eq!(
        resolve(&spec("mps"), &mac).expect("mps").label(),
        "metal:0 (Apple M2 Max)"
    );

    // A discrete GPU beats an integrated one, whatever the order.
    let laptop = Inventory {
        wgpu_compiled: true,
        cuda_compiled: false,
        adapters: vec![
            adapter(
                GraphicsApi::Vulkan,
                0,
                0,
                "Intel UHD",
                AdapterKind::Integrated,
                true,
            ),
            adapter(
                GraphicsApi::Vulkan,
                1,
                0,
                "AMD Radeon RX 7900",
                AdapterKind::Discrete,
                true,
            ),
            adapter(
                GraphicsApi::Dx12,
                0,
                0,
                "AMD Radeon RX 7900",
                AdapterKind::Discrete,
                true,
            ),
        ],
        cuda: Err("no CUDA driver".into()),
    };
    let r = resolve(&DeviceSpec::Auto, &laptop).expect("auto");
    assert_eq!(r.label(), "vulkan:1 (AMD Radeon RX 7900)");
    assert_eq!(
        resolve(&DeviceSpec::Wgpu, &laptop).expect("wgpu").label(),
        "vulkan:1 (AMD Radeon RX 7900)"
    );
    assert_eq!(
        resolve(&spec("vulkan:0"), &laptop)
            .expect("vulkan:0")
            .label(),
        "vulkan:0 (Intel UHD)"
    );
    assert_eq!(
        resolve(&spec("dx12"), &laptop).expect("dx12").label(),
        "dx12:0 (AMD Radeon RX 7900)"
    );

    // Without wgpu compiled in, auto is the CPU.
    let bare = Inventory {
        wgpu_compiled: false,
        cuda_compiled: false,
        adapters: vec![],
        cuda: Err("no CUDA driver".into()),
    };
    assert_eq!(
        resolve(&DeviceSpec::Auto, &bare).expect("auto").target,
        Target::Cpu
    );
}

#[test]
fn explicit_devices_resolve_or_list_what_is_available() {
    let inv = gpu_less();
    // Software Vulkan can still be asked for by name (the parity tests use it).
    assert_eq!(
        resolve(&spec("vulkan"), &inv).expect("vulkan").label(),
        "vulkan:0 (llvmpipe (LLVM 15.0.6, 256 bits))"
    );
    assert_eq!(
        resolve(&DeviceSpec::Wgpu, &inv).expect("wgpu").label(),
        "vulkan:0 (llvmpipe (LLVM 15.0.6, 256 bits))"
    );
    assert_eq!(resolve(&DeviceSpec::Cpu, &inv).expect("cpu").label(), "cpu");

    let e = err("cuda", &inv);
    assert!(e.contains("--features cuda"), "{e}");
    assert!(
        e.contains("Available here:") && e.contains("vulkan:0 (llvmpipe") && e.contains("cpu"),
        "{e}"
    );
    let e = err("vulkan:2", &inv);
    assert!(
        e.contains("1 vulkan adapter") && e.contains("no index 2"),
        "{e}"
    );
    let e = err("metal", &inv);
    assert!(e.contains("no metal adapter"), "{e}");
    let e = err("dx12:0", &inv);
    assert!(e.contains("no dx12 adapter"), "{e}");

    // CUDA compiled in, but no driver / too few devices.
    let mut no_driver = gpu_less();
    no_driver.cuda_compiled = true;
    let e = err("cuda:0", &no_driver);
    assert!(e.contains("no CUDA driver"), "{e}");
    let e = err("cuda:1", &cuda_box(true));
    assert!(
        e.contains("1 CUDA device") && e.contains("cuda:0 (NVIDIA H100"),
        "{e}"
    );

    // wgpu not compiled in.
    let bare = Inventory {
        wgpu_compiled: false,
        ..gpu_less()
    };
    let e = err("vulkan", &bare);
    assert!(e.contains("no wgpu backend"), "{e}");
}

fn resolved(target: Target) -> ResolvedDevice {
    ResolvedDevice {
        target,
        reason: String::new(),
    }
}

#[test]
fn dtypes_are_checked_against_the_device() {
    let cpu = resolved(Target::Cpu);
    for d in [DType::F32, DType::F16, DType::BF16] {
        cpu.check_dtype(d)
            .unwrap_or_else(|e| panic!("cpu {d:?}: {e}"));
    }
    assert!(cpu.check_dtype(DType::F64).is_err());

    let with_f16 = resolved(Target::Wgpu(adapter(
        GraphicsApi::Vulkan,
        0,
        0,
        "GPU",
        AdapterKind::Discrete,
        true,
    )));
    with_f16.check_dtype(DType::F32).expect("f32");
    with_f16
        .check_dtype(DType::F16)
        .expect("f16 with SHADER_F16");
    let e = with_f16
        .check_dtype(DType::BF16)
        .expect_err("no bf16 on wgpu")
        .to_string();
    assert!(
        e.contains("bfloat16") && e.contains("WGSL") && e.contains("float16"),
        "{e}"
    );

    let without_f16 = resolved(Target::Wgpu(adapter(
        GraphicsApi::Vulkan,
        0,
        0,
        "Old GPU",
        AdapterKind::Discrete,
        false,
    )));
    let e = without_f16
        .check_dtype(DType::F16)
        .expect_err("no SHADER_F16")
        .to_string();
    assert!(e.contains("SHADER_F16") && e.contains("float32"), "{e}");
    without_f16.check_dtype(DType::F32).expect("f32");

    let hopper = resolved(Target::Cuda(h100(0)));
    hopper.check_dtype(DType::BF16).expect("bf16 on sm90");
    let turing = resolved(Target::Cuda(CudaDevice {
        compute_capability: (7, 5),
        name: "Tesla T4".into(),
        ..h100(0)
    }));
    turing.check_dtype(DType::F16).expect("f16 on sm75");
    let e = turing
        .check_dtype(DType::BF16)
        .expect_err("bf16 on sm75")
        .to_string();
    assert!(e.contains("8.0") && e.contains("7.5"), "{e}");
}

/// On the machine running the tests: probing never panics, and `auto` only picks a
/// wgpu adapter that is a real GPU.
#[test]
fn probing_this_machine() {
    let inv = Inventory::probe();
    let r = resolve(&DeviceSpec::Auto, &inv).expect("auto always resolves");
    eprintln!("auto → {} ({})", r.label(), r.reason);
    if let Target::Wgpu(a) = &r.target {
        assert!(
            matches!(a.kind, AdapterKind::Discrete | AdapterKind::Integrated),
            "{a:?}"
        );
    }
    if !inv.cuda_compiled
        && !inv
            .adapters
            .iter()
            .any(|a| matches!(a.kind, AdapterKind::Discrete | AdapterKind::Integrated))
    {
        assert_eq!(r.target, Target::Cpu);
    }
}

fn hypergen(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hypergen"))
        .args(args)
        .output()
        .expect("run hypergen")
}

#[test]
fn cli_devices_lists_backends_and_auto() {
    let out = hypergen(&["devices"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "backends in this build: cpu",
        "wgpu adapters:",
        "CUDA devices:",
        "--device auto →",
    ] {
        assert!(stdout.contains(needle), "missing `{needle}` in:\n{stdout}");
    }
}

/// Devices that are absent or not compiled in, and dtypes a device cannot run, stop
/// `generate` before any work with a message, never a panic.
#[test]
fn cli_refuses_unavailable_devices_and_dtypes() {
    let base = [
        "generate",
        "--model",
        "tiny-sdxl-random",
        "--prompt",
        "x",
        "--steps",
        "1",
    ];
    let inv = Inventory::probe();
    let case = |extra: &[&str], needle: &str| {
        (
            extra.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            needle.to_string(),
        )
    };
    let mut cases = vec![case(&["--device", "vulkan:7"], "vulkan:7")];
    if !inv.cuda_compiled {
        cases.push(case(&["--device", "cuda"], "--features cuda"));
    } else if inv.cuda.is_err() {
        cases.push(case(&["--device", "cuda"], "cuda"));
    }
    if !inv.adapters.iter().any(|a| a.api == GraphicsApi::Metal) {
        cases.push(case(&["--device", "metal"], "metal"));
    }
    if let Some(a) = inv.adapters.first() {
        // Refused before anything is compiled for the GPU.
        cases.push(case(
            &["--device", &a.id(), "--dtype", "bfloat16"],
            "bfloat16",
        ));
    }
    for (extra, needle) in cases {
        let args: Vec<&str> = base
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
            .collect();
        let out = hypergen(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} should fail");
        assert!(!stderr.contains("panicked"), "{extra:?} panicked: {stderr}");
        assert!(stderr.contains(needle.as_str()), "{extra:?}: {stderr}");
    }
}

/// A machine without a Vulkan driver (simulated: `VK_ICD_FILENAMES` names no file): the
/// wgpu tests fail with a message naming the fix, and the test binary runs on (its CPU
/// twin passes), never aborting on a crash in the driver loader. Runs this test binary
/// as a child on one wgpu test and its CPU twin.
#[test]
fn wgpu_tests_without_a_driver_fail_with_the_fix() {
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args(["kernels::fused_geglu::", "--test-threads=1"])
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 101 is libtest's "tests failed"; a crash ends by a signal (no code) or 134.
    assert_eq!(
        out.status.code(),
        Some(101),
        "{:?}\n{stdout}\n{stderr}",
        out.status
    );
    for needle in [
        "kernels::fused_geglu::cpu ... ok",
        "kernels::fused_geglu::wgpu ... FAILED",
        "apt-get install mesa-vulkan-drivers libvulkan1",
        "XDG_RUNTIME_DIR",
        "VK_ICD_FILENAMES",
        "1 passed; 1 failed",
    ] {
        assert!(
            stdout.contains(needle),
            "missing `{needle}`:\n{stdout}\n{stderr}"
        );
    }
}
