//! A minimal Hugging Face Hub on 127.0.0.1 for the download tests: serves a folder as
//! one model repository, in the Hub's URL layout and with the headers hf-hub reads.
//!
//! - `GET /api/models/{repo}/revision/{rev}` → `{"sha": …, "siblings": [{"rfilename": …}]}`
//! - `GET /{repo}/resolve/{rev}/{path}` → the file, with `ETag`, `X-Repo-Commit`,
//!   `Content-Length`, and `Range: bytes=a-[b]` answered by 206 and `Content-Range`
//!   (hf-hub sizes a file with `bytes=0-0` and resumes with `bytes=N-`).
//!
//! Every request is logged. Knobs: a token the server insists on, files left out of the
//! listing or answered with 404, and files whose first full download is cut off midway.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The commit every revision resolves to.
pub const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Logged {
    /// The request path.
    pub path: String,
    /// The first byte asked for (`Range: bytes=N-…`), 0 without a range.
    pub range_start: u64,
    /// The last byte asked for, when the range had one.
    pub range_end: Option<u64>,
}

/// How the server misbehaves.
#[derive(Default, Clone)]
pub struct Config {
    /// Requests must carry `Authorization: Bearer TOKEN`, else 401.
    pub token: Option<String>,
    /// Files served but not listed.
    pub unlisted: HashSet<String>,
    /// Files listed but answered with 404.
    pub missing: HashSet<String>,
    /// Files whose first full-body download stops halfway and drops the connection.
    pub cut_once: HashSet<String>,
    /// Serve only this repository id (others 404); `None` serves any id.
    pub only_repo: Option<String>,
}

struct State {
    files: BTreeMap<String, PathBuf>,
    config: Config,
    log: Vec<Logged>,
    already_cut: HashSet<String>,
}

/// A running server; it stops with the test process.
pub struct Hub {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl Hub {
    /// Serves the files under `root` (except `skip`ped top-level folders) as one repository.
    pub fn start(root: &Path, skip: &[&str], config: Config) -> Self {
        let mut files = BTreeMap::new();
        collect(root, root, skip, &mut files);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let endpoint = format!("http://{}", listener.local_addr().expect("address"));
        let state = Arc::new(Mutex::new(State {
            files,
            config,
            log: Vec::new(),
            already_cut: HashSet::new(),
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &state);
                });
            }
        });
        Self { endpoint, state }
    }

    /// The requests so far.
    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().expect("log").log.clone()
    }

    /// Downloads of file contents (not the `bytes=0-0` size probes, not listings).
    pub fn file_gets(&self) -> Vec<Logged> {
        self.log()
            .into_iter()
            .filter(|l| l.path.contains("/resolve/") && l.range_end != Some(0))
            .collect()
    }
}

fn collect(root: &Path, dir: &Path, skip: &[&str], out: &mut BTreeMap<String, PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read fixture")
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .replace('\\', "/");
        if skip.iter().any(|s| rel == *s) {
            continue;
        }
        if path.is_dir() {
            collect(root, &path, skip, out);
        } else {
            out.insert(rel, path);
        }
    }
}

/// A stable ETag per file: FNV-1a of the contents.
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}{:08x}", bytes.len())
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn serve(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut auth = None;
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "authorization" => auth = Some(v.trim().to_string()),
                "range" => range = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let (start, end) = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| (a.parse().unwrap_or(0), b.parse().ok()))
        .unwrap_or((0, None));

    let mut st = state.lock().expect("state");
    st.log.push(Logged {
        path: path.clone(),
        range_start: start,
        range_end: end,
    });
    if let Some(token) = &st.config.token {
        if auth.as_deref() != Some(&format!("Bearer {token}")) {
            drop(st);
            return respond(
                &mut stream,
                "401 Unauthorized",
                &[("Content-Length", "0".into())],
                b"",
            );
        }
    }
    if let Some(repo) = &st.config.only_repo {
        let api = format!("/api/models/{repo}/");
        let file = format!("/{repo}/resolve/");
        if !path.starts_with(&api) && !path.starts_with(&file) {
            drop(st);
            return respond(
                &mut stream,
                "404 Not Found",
                &[("Content-Length", "0".into())],
                b"",
            );
        }
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let siblings: Vec<serde_json::Value> = st
            .files
            .keys()
            .filter(|f| !st.config.unlisted.contains(*f))
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        drop(st);
        if !rest.contains("/revision/") {
            return respond(
                &mut stream,
                "404 Not Found",
                &[("Content-Length", "0".into())],
                b"",
            );
        }
        let body = serde_json::json!({ "sha": SHA, "siblings": siblings }).to_string();
        let headers = [
            ("Content-Type", "application/json".to_string()),
            ("Content-Length", body.len().to_string()),
        ];
        return respond(&mut stream, "200 OK", &headers, body.as_bytes());
    }
    // /{owner}/{name}/resolve/{revision}/{file}
    let file = path
        .split_once("/resolve/")
        .and_then(|(_, r)| r.split_once('/'))
        .map(|(_, f)| f.to_string());
    let Some(file) = file.filter(|f| st.files.contains_key(f) && !st.config.missing.contains(f))
    else {
        drop(st);
        return respond(
            &mut stream,
            "404 Not Found",
            &[("Content-Length", "0".into())],
            b"",
        );
    };
    let full_download = end.is_none();
    let cut =
        full_download && st.config.cut_once.contains(&file) && st.already_cut.insert(file.clone());
    let source = st.files[&file].clone();
    drop(st);

    let bytes = std::fs::read(source)?;
    let total = bytes.len() as u64;
    let last = end
        .unwrap_or(total.saturating_sub(1))
        .min(total.saturating_sub(1));
    let body: &[u8] = if bytes.is_empty() || start >= total {
        &[]
    } else {
        &bytes[start as usize..=last as usize]
    };
    let mut headers = vec![
        ("ETag", format!("\"{}\"", etag(&bytes))),
        ("X-Repo-Commit", SHA.to_string()),
        ("Accept-Ranges", "bytes".into()),
        ("Content-Length", body.len().to_string()),
    ];
    let status = if range.is_some() {
        headers.push(("Content-Range", format!("bytes {start}-{last}/{total}")));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    if cut {
        // Promise the whole body, send half, hang up.
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body[..body.len() / 2])?;
        stream.flush()?;
        return stream.shutdown(std::net::Shutdown::Both);
    }
    respond(&mut stream, status, &headers, body)
}
