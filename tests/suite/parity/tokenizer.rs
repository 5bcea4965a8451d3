//! Both SDXL tokenizers against transformers' ids for every case in
//! `reference/tokenizer_cases.json`.

use hypergen::model::tokenizer::ClipTokenizer;
use hypergen::Error;
use serde::Deserialize;

use crate::common::reference_dir;

/// One entry of `tokenizer_cases.json`.
#[derive(Deserialize)]
pub struct Case {
    pub prompt: String,
    pub tokenizer: Vec<u32>,
    pub tokenizer_2: Vec<u32>,
    pub untruncated_len: usize,
}

/// The cases, in file order.
pub fn cases() -> Vec<Case> {
    let path = reference_dir().join("tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("tokenizer_cases.json parses")
}

/// The reference `untruncated_len` for one tokenizer's ids.
///
/// The file holds one count per prompt, `tokenizer`'s. `tokenizer_2` can count
/// differently: its pad token `!` is a special token, so `!!` is two ids there and one
/// in `tokenizer`. When the reference ids were not truncated (their eos, `<|endoftext|>`,
/// the largest id, sits before the last slot) the count is read off the ids themselves.
fn expected_len(case: &Case, ids: &[u32]) -> usize {
    let eos = ids.iter().copied().max().unwrap_or_default();
    match ids.iter().position(|&i| i == eos) {
        Some(p) if p + 1 < ids.len() => p + 1,
        _ => case.untruncated_len,
    }
}

fn check(folder: &str, want: fn(&Case) -> &Vec<u32>) {
    let tok = ClipTokenizer::from_dir(&crate::common::fixture_dir().join(folder))
        .expect("tokenizer loads");
    assert_eq!(tok.max_length(), 77);
    assert_eq!(tok.eos_id(), 49407);
    let cases = cases();
    assert!(!cases.is_empty(), "no tokenizer cases");
    for case in &cases {
        if folder == "tokenizer" {
            // The file's count is `tokenizer`'s: check the derivation agrees with it.
            assert_eq!(expected_len(case, &case.tokenizer), case.untruncated_len);
        }
        let got = tok.encode(&case.prompt).expect("prompt encodes");
        assert_eq!(&got.ids, want(case), "{folder}: ids of {:?}", case.prompt);
        assert_eq!(
            got.untruncated_len,
            expected_len(case, want(case)),
            "{folder}: untruncated_len of {:?}",
            case.prompt
        );
    }
    eprintln!("{folder}: {} cases identical", cases.len());
}

#[test]
fn tokenizer_ids_match() {
    check("tokenizer", |c| &c.tokenizer);
}

#[test]
fn tokenizer_2_ids_match() {
    check("tokenizer_2", |c| &c.tokenizer_2);
}

#[test]
fn tokenizer_missing_vocab_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = crate::common::fixture_dir().join("tokenizer");
    for f in [
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let err =
        ClipTokenizer::from_dir(dir.path()).expect_err("a folder without vocab.json must fail");
    match &err {
        Error::Tokenizer { path, message } => {
            assert_eq!(path, &dir.path().join("vocab.json"), "error names the file");
            assert!(message.contains("vocab.json"), "message: {message}");
        }
        other => panic!("expected Error::Tokenizer, got {other:?}"),
    }
    eprintln!("{err}");
}

/// A folder with `tokenizer.json` (as many hub repositories ship) is read from that
/// file alone and gives the same ids for every reference case.
#[test]
fn tokenizer_json_folders_match() {
    for folder in ["tokenizer", "tokenizer_2"] {
        let src = crate::common::fixture_dir().join(folder);
        let json = ClipTokenizer::from_dir(&src)
            .expect("tokenizer loads")
            .to_json()
            .expect("serialises");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("tokenizer.json"), json).expect("write");
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
        }
        let tok = ClipTokenizer::from_dir(dir.path()).expect("tokenizer.json folder loads");
        for case in cases() {
            let want = if folder == "tokenizer" {
                &case.tokenizer
            } else {
                &case.tokenizer_2
            };
            let got = tok.encode(&case.prompt).expect("encodes").ids;
            assert_eq!(&got, want, "{folder} via tokenizer.json: {:?}", case.prompt);
        }
    }
}
