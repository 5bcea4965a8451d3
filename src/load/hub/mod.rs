//! Models from the Hugging Face Hub: a repository id (`stabilityai/sdxl-turbo`) becomes a
//! local diffusers-layout folder, a snapshot in the standard Hub cache (`HF_HOME`).
//!
//! Only the files the pipeline reads are downloaded (see [`files`]): one weight set per
//! component (the `fp16` variant for half precision, else the plain files), never the
//! single-file checkpoints or `.bin` duplicates. Files already in the cache are not
//! downloaded again; interrupted downloads resume. `HF_TOKEN` opens gated repositories;
//! `HF_HUB_OFFLINE=1` reads the cache only; `HF_ENDPOINT` names another server.
//!
//! Downloading needs the `hub` cargo feature (hf-hub over ureq, on with `app`); without
//! it a complete cached snapshot is still used.

pub mod files;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[cfg(feature = "hub")]
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
#[cfg(feature = "hub")]
use hf_hub::{Cache, Repo, RepoType};
#[cfg(feature = "hub")]
use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};
use files::FileSource;

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How to reach the Hub and where its cache is. [`HubOptions::from_env`] reads the
/// variables `huggingface_hub` reads; tests build it by hand so that nothing global is
/// involved.
#[derive(Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Server URL (`HF_ENDPOINT`, default [`DEFAULT_ENDPOINT`]).
    pub endpoint: String,
    /// The cache's `hub` folder (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Access token for gated and private repositories (`HF_TOKEN`, else the token file
    /// `huggingface-cli login` writes).
    pub token: Option<String>,
    /// Read the cache only, never the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Draw download progress bars on stderr.
    pub progress: bool,
    /// Retries of an interrupted download within one call; each resumes where the last
    /// stopped.
    pub retries: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self::from_env()
    }
}

/// Never prints the token.
impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .field("retries", &self.retries)
            .finish()
    }
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl HubOptions {
    /// Options from the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Options from `var`, a lookup of environment variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .or_else(|| var("USERPROFILE").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let file = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join("token"));
                std::fs::read_to_string(file).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Self {
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
            cache_dir,
            token,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v)),
            progress: true,
            retries: 3,
        }
    }
}

/// Whether `s` has the shape of a Hub repository id: `name` or `owner/name`, of
/// letters, digits, `-`, `_` and `.`.
pub fn is_repo_id(s: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match s.split_once('/') {
        Some((owner, name)) => part_ok(owner) && part_ok(name),
        None => part_ok(s),
    }
}

/// A local diffusers-layout SDXL folder for `id_or_path`: the path itself when it is a
/// folder, else the Hub repository's snapshot in the cache (downloading what is missing).
/// Options come from the environment ([`HubOptions::from_env`]).
pub fn resolve_model(
    id_or_path: &str,
    revision: Option<&str>,
    variant: Option<&str>,
) -> Result<PathBuf> {
    resolve_model_with(id_or_path, revision, variant, &HubOptions::from_env())
}

/// [`resolve_model`] with explicit options.
pub fn resolve_model_with(
    id_or_path: &str,
    revision: Option<&str>,
    variant: Option<&str>,
    options: &HubOptions,
) -> Result<PathBuf> {
    resolve(id_or_path, revision, variant, options, Kind::Pipeline)
}

/// A local VAE folder (`config.json` and weights) for `id_or_path`: a folder, or a Hub
/// repository holding a lone VAE (such as `madebyollin/sdxl-vae-fp16-fix`) or a
/// pipeline, whose `vae/` is used.
pub fn resolve_vae_with(
    id_or_path: &str,
    revision: Option<&str>,
    variant: Option<&str>,
    options: &HubOptions,
) -> Result<PathBuf> {
    resolve(id_or_path, revision, variant, options, Kind::Vae)
}

/// A single file of a Hub repository (such as a single-file checkpoint), downloaded into
/// the cache if needed; its local path.
pub fn resolve_file_with(
    repo: &str,
    file: &str,
    revision: Option<&str>,
    options: &HubOptions,
) -> Result<PathBuf> {
    resolve(repo, revision, None, options, Kind::File(file))
}

#[derive(Clone, Copy)]
enum Kind<'a> {
    Pipeline,
    Vae,
    /// One file, by its path in the repository.
    File(&'a str),
}

/// Fetches what `kind` needs; the path, inside the snapshot, to return.
fn fetch(
    kind: Kind<'_>,
    source: &mut dyn FileSource,
    variant: Option<&str>,
) -> std::result::Result<String, String> {
    match kind {
        Kind::Pipeline => files::fetch_pipeline(source, variant).map(|()| String::new()),
        Kind::Vae => files::fetch_vae(source, variant).map(str::to_string),
        Kind::File(file) => {
            if !source.listing().contains(file) {
                return Err(format!("the repository has no file `{file}`"));
            }
            source.fetch(file)?;
            Ok(file.to_string())
        }
    }
}

fn resolve(
    id_or_path: &str,
    revision: Option<&str>,
    variant: Option<&str>,
    options: &HubOptions,
    kind: Kind<'_>,
) -> Result<PathBuf> {
    let local = Path::new(id_or_path);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    if !is_repo_id(id_or_path) {
        return Err(Error::invalid(
            "model",
            format!("`{id_or_path}` is neither a folder nor a Hub repository id (owner/name)"),
        ));
    }
    let revision = revision.unwrap_or("main");
    let hub_err = |message: String| Error::Hub {
        repo: id_or_path.to_string(),
        message,
    };
    if options.offline {
        return offline(id_or_path, revision, variant, options, kind).map_err(|m| {
            hub_err(format!(
                "{m} (HF_HUB_OFFLINE is set, so nothing is downloaded)"
            ))
        });
    }
    #[cfg(not(feature = "hub"))]
    return offline(id_or_path, revision, variant, options, kind).map_err(|m| {
        hub_err(format!(
            "{m}; this build cannot download (it lacks the `hub` cargo feature)"
        ))
    });
    #[cfg(feature = "hub")]
    match online(id_or_path, revision, variant, options, kind) {
        Ok(dir) => Ok(dir),
        Err(Failure::Unreachable(why)) => {
            // As huggingface_hub does: without a connection, a complete cached snapshot
            // is good enough.
            match offline(id_or_path, revision, variant, options, kind) {
                Ok(dir) => {
                    tracing::warn!(repo = id_or_path, "{why}; using the cached snapshot {}", dir.display());
                    Ok(dir)
                }
                Err(cache) => Err(hub_err(format!(
                    "{why}, and the cache cannot stand in: {cache}. Set HF_HUB_OFFLINE=1 to use the cache only"
                ))),
            }
        }
        Err(Failure::Other(message)) => Err(hub_err(message)),
    }
}

#[cfg(feature = "hub")]
enum Failure {
    /// The server could not be reached.
    Unreachable(String),
    /// Anything else: refused, missing, corrupt.
    Other(String),
}

#[cfg(feature = "hub")]
fn repo_of(id: &str, revision: &str) -> Repo {
    Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string())
}

#[cfg(feature = "hub")]
/// What an hf-hub error means to a user.
fn explain(err: &ApiError, endpoint: &str, what: &str) -> Failure {
    if let ApiError::RequestError(e) = err {
        match &**e {
            ureq::Error::Status(code @ (401 | 403), _) => {
                return Failure::Other(format!(
                    "{what}: access denied (HTTP {code}): the repository is gated or private; accept its \
                     terms on the Hub and set HF_TOKEN to a token that may read it"
                ))
            }
            ureq::Error::Status(404, _) => {
                return Failure::Other(format!("{what}: not found (HTTP 404); check the id and --revision"))
            }
            ureq::Error::Status(code, _) => return Failure::Other(format!("{what}: HTTP {code}")),
            ureq::Error::Transport(t) => {
                return Failure::Unreachable(format!("{what}: cannot reach {endpoint}: {t}"))
            }
        }
    }
    Failure::Other(format!("{what}: {err}"))
}

#[cfg(feature = "hub")]
struct Online<'a> {
    repo: ApiRepo,
    listing: BTreeSet<String>,
    snapshot: PathBuf,
    options: &'a HubOptions,
}

#[cfg(feature = "hub")]
impl FileSource for Online<'_> {
    fn listing(&self) -> &BTreeSet<String> {
        &self.listing
    }

    fn fetch(&mut self, file: &str) -> std::result::Result<PathBuf, String> {
        let local = self.snapshot.join(file);
        if local.is_file() {
            return Ok(local);
        }
        tracing::info!(file, "downloading");
        let bar = DownloadBar::new(self.options.progress);
        let path = self.repo.download_with_progress(file, bar).map_err(|e| {
            match explain(&e, &self.options.endpoint, &format!("downloading `{file}`")) {
                Failure::Unreachable(m) | Failure::Other(m) => m,
            }
        })?;
        if path != local {
            return Err(format!(
                "the repository changed while downloading (`{file}` came from {}); run again",
                path.display()
            ));
        }
        Ok(local)
    }
}

#[cfg(feature = "hub")]
fn online(
    id: &str,
    revision: &str,
    variant: Option<&str>,
    options: &HubOptions,
    kind: Kind<'_>,
) -> std::result::Result<PathBuf, Failure> {
    let api = ApiBuilder::from_cache(Cache::new(options.cache_dir.clone()))
        .with_endpoint(options.endpoint.clone())
        .with_token(options.token.clone())
        .with_progress(false)
        .with_retries(options.retries)
        .build()
        .map_err(|e| Failure::Other(format!("setting up the HTTP client: {e}")))?;
    let repo = repo_of(id, revision);
    let api_repo = api.repo(repo.clone());
    let info = api_repo.info().map_err(|e| {
        explain(
            &e,
            &options.endpoint,
            &format!("listing files at revision `{revision}`"),
        )
    })?;
    let snapshot = options
        .cache_dir
        .join(repo.folder_name())
        .join("snapshots")
        .join(&info.sha);
    let mut source = Online {
        repo: api_repo,
        listing: info.siblings.into_iter().map(|s| s.rfilename).collect(),
        snapshot: snapshot.clone(),
        options,
    };
    let folder = fetch(kind, &mut source, variant).map_err(Failure::Other)?;
    // Point the revision at this commit even when every file was cached already, so
    // that an offline start finds it.
    Cache::new(options.cache_dir.clone())
        .repo(repo)
        .create_ref(&info.sha)
        .map_err(|e| Failure::Other(format!("writing the cache's ref for `{revision}`: {e}")))?;
    Ok(snapshot.join(folder))
}

struct Cached {
    listing: BTreeSet<String>,
    snapshot: PathBuf,
}

impl FileSource for Cached {
    fn listing(&self) -> &BTreeSet<String> {
        &self.listing
    }

    fn fetch(&mut self, file: &str) -> std::result::Result<PathBuf, String> {
        Ok(self.snapshot.join(file))
    }
}

/// The cache's folder of a model repository, as huggingface_hub names it.
fn cache_folder_name(id: &str) -> String {
    format!("models--{}", id.replace('/', "--"))
}

/// The cached snapshot of `revision`, checked to hold every file the pipeline needs.
fn offline(
    id: &str,
    revision: &str,
    variant: Option<&str>,
    options: &HubOptions,
    kind: Kind<'_>,
) -> std::result::Result<PathBuf, String> {
    let repo_dir = options.cache_dir.join(cache_folder_name(id));
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_string()
    } else {
        let ref_file = repo_dir.join("refs").join(revision);
        std::fs::read_to_string(&ref_file)
            .map(|s| s.trim().to_string())
            .map_err(|_| {
                format!(
                    "revision `{revision}` is not in the cache ({} does not exist)",
                    ref_file.display()
                )
            })?
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(format!("the cache has no snapshot {}", snapshot.display()));
    }
    let mut source = Cached {
        listing: files::list_dir(&snapshot),
        snapshot: snapshot.clone(),
    };
    let folder = fetch(kind, &mut source, variant).map_err(|m| {
        format!(
            "the cached snapshot {} is incomplete: {m}",
            snapshot.display()
        )
    })?;
    Ok(snapshot.join(folder))
}

#[cfg(feature = "hub")]
/// A download progress bar (hidden when progress is off or stderr is not a terminal).
#[cfg(feature = "hub")]
struct DownloadBar {
    bar: ProgressBar,
}

#[cfg(feature = "hub")]
impl DownloadBar {
    fn new(visible: bool) -> Self {
        Self {
            bar: if visible {
                ProgressBar::new(0)
            } else {
                ProgressBar::hidden()
            },
        }
    }
}

#[cfg(feature = "hub")]
impl hf_hub::api::Progress for DownloadBar {
    fn init(&mut self, size: usize, filename: &str) {
        self.bar.set_length(size as u64);
        self.bar.set_style(
            ProgressStyle::with_template(
                "{msg:40} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        self.bar.set_message(filename.to_string());
    }

    fn update(&mut self, size: usize) {
        self.bar.inc(size as u64);
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for ok in [
            "stabilityai/sdxl-turbo",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "gpt2",
            "a_b/c.d",
        ] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "",
            "a/b/c",
            "../x",
            "./x",
            "/abs/path",
            "a/",
            "with space/x",
            "x/..y",
            "C:\\models",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }

    #[test]
    fn options_from_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let o = HubOptions::from_vars(vars(&[("HOME", "/home/u")]));
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert!(!o.offline);
        let o = HubOptions::from_vars(vars(&[
            ("HOME", "/home/u"),
            ("HF_HOME", "/data/hf"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_TOKEN", " hf_abc \n"),
        ]));
        assert_eq!(o.cache_dir, PathBuf::from("/data/hf/hub"));
        assert_eq!(o.endpoint, "http://127.0.0.1:9");
        assert!(o.offline);
        assert_eq!(o.token.as_deref(), Some("hf_abc"));
        let o = HubOptions::from_vars(vars(&[("HF_HUB_CACHE", "/c"), ("HF_HUB_OFFLINE", "0")]));
        assert_eq!(o.cache_dir, PathBuf::from("/c"));
        assert!(!o.offline);
    }
}
