//! Typed errors for everything below the command line and the HTTP layer.

use std::path::PathBuf;

/// Every failure hypergen's library can report. Messages name the file, tensor or
/// argument at fault so that a user can act on them without a backtrace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// An IP-Adapter or its image encoder cannot be used.
    #[error("{path}: IP-Adapter: {message}")]
    IpAdapter {
        /// The adapter file or encoder folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A required file is absent.
    #[error("{path}: file not found ({what})")]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
        /// What the file would have held.
        what: String,
    },
    /// A JSON file is malformed or lacks a required key (serde names the key).
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error, which names the offending key and position.
        source: serde_json::Error,
    },
    /// A config file parses but asks for something hypergen does not implement.
    #[error("{path}: unsupported configuration: {message}")]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// What is not supported.
        message: String,
    },
    /// A config asks for something hypergen does not implement, found while building a
    /// model from it; the loader names the file ([`Error::in_file`]).
    #[error("unsupported configuration: {0}")]
    UnsupportedConfig(String),
    /// A safetensors file is truncated or corrupt.
    #[error("{path}: truncated or corrupt safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// One tensor in a weight file cannot be used (wrong shape, unreadable data).
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        /// The weight file.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
        /// What is wrong with it.
        message: String,
    },
    /// Tensors the model needs are absent from its weight files.
    #[error("{component}: {} tensor(s) missing from {files}: {}", .tensors.len(), .tensors.join(", "))]
    MissingTensors {
        /// The model component (`unet`, `vae`, …).
        component: String,
        /// The weight files that were read.
        files: String,
        /// The missing tensors' names.
        tensors: Vec<String>,
    },
    /// Weight files hold tensors that the model built from the config does not have.
    #[error("{component}: {} unexpected tensor(s) in {files} (config and weights disagree): {}", .tensors.len(), .tensors.join(", "))]
    UnusedTensors {
        /// The model component.
        component: String,
        /// The weight files that were read.
        files: String,
        /// The tensors nobody asked for.
        tensors: Vec<String>,
    },
    /// The tokenizer files could not be loaded or used.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The tokenizer folder or file.
        path: PathBuf,
        /// The underlying error.
        message: String,
    },
    /// A caller passed an argument outside what the pipeline accepts.
    #[error("invalid `{name}`: {message}")]
    InvalidArgument {
        /// The argument's name as the caller knows it.
        name: &'static str,
        /// Why it was refused.
        message: String,
    },
    /// The Hugging Face Hub (or its local cache) could not provide a model.
    #[error("hub model `{repo}`: {message}")]
    Hub {
        /// The repository id (`stabilityai/sdxl-turbo`).
        repo: String,
        /// What went wrong and, where possible, what to do about it.
        message: String,
    },
    /// A LoRA file cannot be used: not a LoRA, a pickle, an unsupported layer type.
    #[error("LoRA {path}: {message}")]
    Lora {
        /// The LoRA file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// LoRA layers that match no layer of the model (another architecture's adapter).
    #[error("LoRA {path}: {count} layer(s) match no layer of this model: {keys}")]
    LoraUnmatched {
        /// The LoRA file.
        path: PathBuf,
        /// How many layers matched nothing.
        count: usize,
        /// A few of their names.
        keys: String,
    },
    /// A LoRA layer whose shapes do not fit the model's layer.
    #[error("LoRA {path}: layer {layer}: {message}")]
    LoraShape {
        /// The LoRA file.
        path: PathBuf,
        /// The model layer (`unet.down_blocks.1.…to_q`).
        layer: String,
        /// The shapes that disagree.
        message: String,
    },
    /// A tensor operation failed at run time (for example reading back device memory).
    #[error("backend: {0}")]
    Backend(String),
    /// The run was cancelled by its caller between two steps.
    #[error("cancelled")]
    Cancelled,
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(name: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            message: message.into(),
        }
    }

    /// Names the config file an [`Error::UnsupportedConfig`] came from; other errors
    /// pass through unchanged.
    pub fn in_file(self, path: impl Into<PathBuf>) -> Self {
        match self {
            Error::UnsupportedConfig(message) => Error::Unsupported {
                path: path.into(),
                message,
            },
            other => other,
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
