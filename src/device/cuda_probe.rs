//! Asks NVIDIA's driver library (libcuda) for its devices without going through Burn:
//! burn-cuda panics when the driver or the GPU is missing, so presence is checked here
//! first. Works whether or not the `cuda` feature is compiled in.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::sync::OnceLock;

use super::inventory::CudaDevice;

#[cfg(target_os = "windows")]
const LIBRARIES: &[&str] = &["nvcuda.dll"];
#[cfg(not(target_os = "windows"))]
const LIBRARIES: &[&str] = &["libcuda.so.1", "libcuda.so"];

const CUDA_SUCCESS: c_int = 0;
const ATTRIBUTE_CC_MAJOR: c_int = 75;
const ATTRIBUTE_CC_MINOR: c_int = 76;

type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;

/// The CUDA devices, or why there are none. Probed once per process.
pub fn devices() -> Result<Vec<CudaDevice>, String> {
    static PROBE: OnceLock<Result<Vec<CudaDevice>, String>> = OnceLock::new();
    PROBE.get_or_init(probe).clone()
}

fn describe(code: c_int) -> String {
    let what = match code {
        100 => "no CUDA-capable device is detected",
        35 => "the driver is older than the CUDA runtime",
        3 => "the driver is not initialised",
        999 => "unknown driver error",
        _ => "driver error",
    };
    format!("{what} (CUresult {code})")
}

fn check(code: c_int, call: &str) -> Result<(), String> {
    if code == CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{call}: {}", describe(code)))
    }
}

fn probe() -> Result<Vec<CudaDevice>, String> {
    let mut errors = Vec::new();
    let library = LIBRARIES.iter().find_map(|name| {
        // SAFETY: loading NVIDIA's driver library runs its initialisers, which is what
        // every CUDA program does; nothing else of ours is involved.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => Some(lib),
            Err(e) => {
                // libloading's message already names the library.
                errors.push(e.to_string());
                None
            }
        }
    });
    let Some(library) = library else {
        let first = errors.into_iter().next().unwrap_or_default();
        return Err(format!("no CUDA driver ({first})"));
    };
    // The driver stays loaded for the life of the process: burn-cuda loads it again, and
    // unloading an initialised libcuda is not something it supports.
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    // SAFETY: the symbol types are the driver API's documented C signatures.
    unsafe { query(library) }
}

/// # Safety
///
/// `library` must be NVIDIA's libcuda, whose symbols have the driver API's signatures.
unsafe fn query(library: &libloading::Library) -> Result<Vec<CudaDevice>, String> {
    fn sym<T: Copy>(library: &libloading::Library, name: &str) -> Result<T, String> {
        // SAFETY: the caller's contract: `T` is the documented signature of `name`.
        unsafe { library.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| format!("libcuda lacks {name}: {e}"))
    }
    let init: CuInit = sym(library, "cuInit")?;
    let count: CuDeviceGetCount = sym(library, "cuDeviceGetCount")?;
    let get: CuDeviceGet = sym(library, "cuDeviceGet")?;
    let get_name: CuDeviceGetName = sym(library, "cuDeviceGetName")?;
    let total_mem: CuDeviceTotalMem = sym(library, "cuDeviceTotalMem_v2")?;
    let attribute: CuDeviceGetAttribute = sym(library, "cuDeviceGetAttribute")?;

    // SAFETY (all calls below): plain driver API calls with valid out-pointers.
    check(unsafe { init(0) }, "cuInit")?;
    let mut n: c_int = 0;
    check(unsafe { count(&mut n) }, "cuDeviceGetCount")?;
    let mut out = Vec::new();
    for ordinal in 0..n {
        let mut dev: c_int = 0;
        check(unsafe { get(&mut dev, ordinal) }, "cuDeviceGet")?;
        let mut name = [0 as c_char; 256];
        check(
            unsafe { get_name(name.as_mut_ptr(), name.len() as c_int, dev) },
            "cuDeviceGetName",
        )?;
        // SAFETY: the driver writes a NUL-terminated string into the buffer; the last
        // byte is forced to NUL in case it filled it.
        name[name.len() - 1] = 0;
        let name = unsafe { CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let mut bytes: usize = 0;
        check(unsafe { total_mem(&mut bytes, dev) }, "cuDeviceTotalMem")?;
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        check(
            unsafe { attribute(&mut major, ATTRIBUTE_CC_MAJOR, dev) },
            "cuDeviceGetAttribute",
        )?;
        check(
            unsafe { attribute(&mut minor, ATTRIBUTE_CC_MINOR, dev) },
            "cuDeviceGetAttribute",
        )?;
        out.push(CudaDevice {
            index: ordinal as usize,
            name,
            memory_bytes: bytes as u64,
            compute_capability: (major, minor),
        });
    }
    if out.is_empty() {
        return Err("the CUDA driver is installed but reports no device".into());
    }
    Ok(out)
}
