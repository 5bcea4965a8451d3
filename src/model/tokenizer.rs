//! CLIP's byte-level BPE tokenizer, as transformers' `CLIPTokenizer` (the
//! `tokenizers`-backed one) encodes prompts for SDXL: `<|startoftext|>`, the prompt's
//! tokens truncated to fit, `<|endoftext|>`, then padding to `model_max_length`.
//!
//! SDXL's two tokenizers share one vocabulary and differ only in the pad token:
//! `tokenizer/` pads with `<|endoftext|>`, `tokenizer_2/` with `!` (id 0).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use tokenizers::models::bpe::{BpeBuilder, Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// CLIP's context length, used when the config does not name one.
const DEFAULT_MAX_LENGTH: usize = 77;

/// transformers writes a huge sentinel (`VERY_LARGE_INTEGER`, about 1e30) as
/// `model_max_length` when a tokenizer has no limit; anything above this counts as unset.
const UNSET_MAX_LENGTH: f64 = 1e9;

/// How CLIP splits normalised text into words before BPE: contractions, letter runs,
/// single digits, and runs of other non-space characters. Whitespace is dropped.
const CLIP_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A prompt encoded for a CLIP text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly `max_length` ids: bos, the prompt's tokens truncated to
    /// `max_length - 2`, eos, then the pad id.
    pub ids: Vec<u32>,
    /// How many ids (bos and eos included) the prompt would take untruncated; larger
    /// than `max_length` means the prompt was cut.
    pub untruncated_len: usize,
}

/// One CLIP tokenizer folder (`tokenizer/` or `tokenizer_2/` of an SDXL repository).
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    dir: PathBuf,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

/// The keys of `tokenizer_config.json` / `special_tokens_map.json` hypergen reads.
/// Tokens are either a string or an object with `content` (transformers writes both).
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    model_max_length: Option<Value>,
    bos_token: Option<Value>,
    eos_token: Option<Value>,
    unk_token: Option<Value>,
    pad_token: Option<Value>,
}

/// A special token as the config files describe it.
#[derive(Debug, Clone)]
struct SpecialToken {
    content: String,
    normalized: bool,
}

impl SpecialToken {
    fn parse(value: &Value) -> Option<Self> {
        match value {
            Value::String(s) => Some(Self {
                content: s.clone(),
                normalized: false,
            }),
            Value::Object(map) => Some(Self {
                content: map.get("content")?.as_str()?.to_string(),
                normalized: map
                    .get("normalized")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            }),
            _ => None,
        }
    }

    fn added(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), true).normalized(self.normalized)
    }
}

fn tok_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads an optional JSON config; absent files give the defaults.
fn read_optional(path: &Path) -> Result<TokenizerConfig> {
    if !path.is_file() {
        return Ok(TokenizerConfig::default());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The special tokens and length limit of one tokenizer.
struct Specials {
    bos: SpecialToken,
    eos: SpecialToken,
    unk: SpecialToken,
    pad: SpecialToken,
    max_length: usize,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` when present, else CLIP's BPE built
    /// from `vocab.json` and `merges.txt`. `tokenizer_config.json` (then
    /// `special_tokens_map.json`) gives `model_max_length` and the special tokens.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = read_optional(&dir.join("tokenizer_config.json"))?;
        let map = read_optional(&dir.join("special_tokens_map.json"))?;
        let token = |pick: fn(&TokenizerConfig) -> &Option<Value>, default: &str| {
            pick(&config)
                .as_ref()
                .or(pick(&map).as_ref())
                .and_then(SpecialToken::parse)
                .unwrap_or_else(|| SpecialToken {
                    content: default.into(),
                    normalized: false,
                })
        };
        let max_length = match config.model_max_length.as_ref().and_then(Value::as_f64) {
            Some(n) if n < UNSET_MAX_LENGTH => n as usize,
            _ => DEFAULT_MAX_LENGTH,
        };
        let specials = Specials {
            bos: token(|c| &c.bos_token, "<|startoftext|>"),
            eos: token(|c| &c.eos_token, "<|endoftext|>"),
            unk: token(|c| &c.unk_token, "<|endoftext|>"),
            pad: token(|c| &c.pad_token, "<|endoftext|>"),
            max_length,
        };
        if max_length < 2 {
            return Err(tok_err(
                &dir.join("tokenizer_config.json"),
                format!("model_max_length {max_length} leaves no room for bos and eos"),
            ));
        }

        let json = dir.join("tokenizer.json");
        let tokenizer = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e.to_string()))?
        } else {
            build_bpe(dir, &specials.unk.content)?
        };
        Self::finish(tokenizer, specials, dir)
    }

    /// Builds CLIP's tokenizer from the contents of `vocab.json` and `merges.txt`, for
    /// models that ship no tokenizer folder (the built-in ones). `pad` is the padding
    /// token (`<|endoftext|>` for SDXL's first tokenizer, `!` for its second) and
    /// `max_length` the context length (77); the other special tokens are CLIP's.
    pub fn from_memory(
        vocab_json: &str,
        merges_txt: &str,
        pad: &str,
        max_length: usize,
    ) -> Result<Self> {
        let label = Path::new("<built-in CLIP tokenizer>");
        if max_length < 2 {
            return Err(tok_err(
                label,
                format!("max_length {max_length} leaves no room for bos and eos"),
            ));
        }
        let special = |content: &str| SpecialToken {
            content: content.into(),
            normalized: false,
        };
        let specials = Specials {
            bos: special("<|startoftext|>"),
            eos: special("<|endoftext|>"),
            unk: special("<|endoftext|>"),
            pad: special(pad),
            max_length,
        };
        let vocab: HashMap<String, u32> = serde_json::from_str(vocab_json)
            .map_err(|e| tok_err(label, format!("vocab.json: {e}")))?;
        let mut merges = Vec::new();
        // As `tokenizers` reads merges.txt: a `#version` header, then one pair per line.
        for (rank, line) in merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version"))
            .enumerate()
        {
            match line.split(' ').collect::<Vec<_>>()[..] {
                [a, b] => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(tok_err(
                        label,
                        format!("merges.txt line {}: expected two tokens", rank + 1),
                    ))
                }
            }
        }
        let vocab: Vocab = vocab.into_iter().collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges);
        let tokenizer = clip_pipeline(bpe, label, &specials.unk.content)?;
        Self::finish(tokenizer, specials, label)
    }

    /// Truncation and padding off (done in [`encode`](Self::encode)), special tokens
    /// added, their ids looked up.
    fn finish(mut tokenizer: Tokenizer, specials: Specials, dir: &Path) -> Result<Self> {
        let Specials {
            bos,
            eos,
            unk,
            pad,
            max_length,
        } = specials;
        // Truncation and padding are done here, so that both kinds of folder agree.
        tokenizer
            .with_truncation(None)
            .map_err(|e| tok_err(dir, e.to_string()))?;
        tokenizer.with_padding(None);
        // Special tokens written in a prompt encode as themselves, as in transformers.
        tokenizer.add_special_tokens(&[bos.added(), eos.added(), unk.added(), pad.added()]);

        let id = |t: &SpecialToken, what: &str| {
            tokenizer.token_to_id(&t.content).ok_or_else(|| {
                tok_err(
                    dir,
                    format!("{what} token `{}` is not in the vocabulary", t.content),
                )
            })
        };
        Ok(Self {
            bos_id: id(&bos, "bos")?,
            eos_id: id(&eos, "eos")?,
            pad_id: id(&pad, "pad")?,
            max_length,
            tokenizer,
            dir: dir.to_path_buf(),
        })
    }

    /// The tokenizer as a `tokenizer.json` document (the `tokenizers` library's format),
    /// e.g. to convert a `vocab.json` + `merges.txt` folder into a single file.
    pub fn to_json(&self) -> Result<String> {
        self.tokenizer
            .to_string(false)
            .map_err(|e| tok_err(&self.dir, format!("serialising: {e}")))
    }

    /// Encodes `prompt` to exactly [`max_length`](Self::max_length) ids.
    pub fn encode(&self, prompt: &str) -> Result<Encoded> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| tok_err(&self.dir, format!("encoding the prompt: {e}")))?;
        let tokens = encoding.get_ids();
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(tokens.iter().take(self.max_length - 2));
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(Encoded {
            ids,
            untruncated_len: tokens.len() + 2,
        })
    }

    /// The prompt's token ids alone, neither framed by BOS and EOS nor cut to any
    /// length (A1111 tokenizes each parsed piece of a prompt so).
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| tok_err(&self.dir, format!("encoding the prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The id of a vocabulary entry (`",</w>"` is the comma that ends a word).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The number of ids every encoding has (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id padding fills with.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

/// CLIP's tokenizer from the `vocab.json` and `merges.txt` files of `dir` (see
/// [`clip_pipeline`]).
fn build_bpe(dir: &Path, unk: &str) -> Result<Tokenizer> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for (path, what) in [(&vocab, "vocab.json"), (&merges, "merges.txt")] {
        if !path.is_file() {
            return Err(tok_err(
                path,
                format!("{what} not found (a tokenizer folder needs tokenizer.json, or vocab.json and merges.txt)"),
            ));
        }
    }
    let bpe = BPE::from_file(&path_str(&vocab)?, &path_str(&merges)?);
    clip_pipeline(bpe, dir, unk)
}

/// The tokenizer around CLIP's BPE model: NFC, whitespace runs to one space, lowercase;
/// CLIP's word split then byte-level mapping; BPE with a `</w>` end-of-word suffix.
fn clip_pipeline(bpe: BpeBuilder, dir: &Path, unk: &str) -> Result<Tokenizer> {
    let bpe = bpe
        .unk_token(unk.to_string())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .build()
        .map_err(|e| tok_err(dir, format!("reading vocab.json and merges.txt: {e}")))?;

    let regex_err = |e: tokenizers::Error| tok_err(dir, format!("building the normaliser: {e}"));
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(regex_err)?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(regex_err)?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NormSequence::new(vec![
        NFC.into(),
        whitespace.into(),
        Lowercase.into(),
    ])));
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, true).into(),
    ])));
    Ok(tokenizer)
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| tok_err(path, "path is not valid UTF-8"))
}
