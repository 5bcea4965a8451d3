//! Prompts as SDXL users write them: AUTOMATIC1111's syntax (weights, `BREAK`, escapes),
//! prompts longer than one CLIP window, clip skip and textual-inversion embeddings, as
//! A1111 computes them (`modules/prompt_parser.py`, `sd_hijack_clip.py`,
//! `sd_emphasis.py`), or diffusers' plain text ([`PromptSyntax::Plain`]).
//!
//! For A1111 syntax, each encoder: [`parse_prompt_attention`], every piece tokenized on its
//! own, [`chunk_prompt`] (chunks of 75 tokens framed by BOS and EOS), each chunk encoded on
//! its own, then "Original" emphasis per chunk (multiply by the weights, restore the
//! chunk's mean); chunks are concatenated on the sequence axis, the encoders on channels,
//! and the pooled embedding is the second encoder's of the first chunk.

mod chunks;
mod parse;

pub use chunks::{chunk_prompt, Chunk, ChunkIds, Chunks, EmbeddingTokens, Fix, COMMA_BACKTRACK};
pub use parse::{
    extract_extra_networks, parse_prompt_attention, ExtraNetwork, Piece, BREAK_TEXT, BREAK_WEIGHT,
};

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use burn::tensor::{Int, Tensor, TensorData};

use super::SdxlPipeline;
use crate::error::{Error, Result};
use crate::model::clip::{ClipTextModel, TokenInsert};
use crate::model::tokenizer::ClipTokenizer;
use crate::FusedOps;

/// How a prompt's text is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum PromptSyntax {
    /// AUTOMATIC1111's: `(word:1.3)`, `((word))`, `[word]`, `\(` escapes, `BREAK`,
    /// textual-inversion names, any length (in chunks of 75 tokens).
    #[default]
    A1111,
    /// diffusers': the text as it is, cut at 77 tokens.
    Plain,
}

impl PromptSyntax {
    /// Every syntax, as [`fmt::Display`] names them.
    pub const ALL: [Self; 2] = [Self::A1111, Self::Plain];

    /// The name flags and requests use: `a1111` or `plain`.
    pub fn name(self) -> &'static str {
        match self {
            Self::A1111 => "a1111",
            Self::Plain => "plain",
        }
    }
}

impl fmt::Display for PromptSyntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PromptSyntax {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::invalid("prompt_syntax", format!("`{s}`: use a1111 or plain")))
    }
}

/// A textual-inversion embedding for SDXL (the `clip_l` / `clip_g` safetensors people
/// download): vectors that a word equal to its name stands for in a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct TextualInversion {
    /// The word that inserts it: the file's stem.
    pub name: String,
    /// The file it was read from.
    pub path: PathBuf,
    /// How many vectors (tokens) it inserts.
    pub vectors: usize,
    /// `[vectors, D1]` row-major, for the first text encoder (`clip_l`).
    pub clip_l: Vec<f32>,
    /// `[vectors, D2]` row-major, for the second text encoder (`clip_g`).
    pub clip_g: Vec<f32>,
}

/// One encoder's output for one prompt in A1111's way.
struct Encoded<B: FusedOps> {
    /// `[1, chunks · L, C]` after emphasis.
    hidden: Tensor<B, 3>,
    /// `[1, P]` the first chunk's projected pooled output, when asked for.
    pooled: Option<Tensor<B, 2>>,
    /// Chunks and their tokens.
    chunks: Chunks,
}

/// How a prompt was split: per chunk, its tokens (what A1111's UI shows as `75/150`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTokens {
    /// Tokens in each chunk (BOS, EOS and padding not counted).
    pub per_chunk: Vec<usize>,
    /// A1111's count: every chunk but the last counted full, plus the last's tokens.
    pub total: usize,
    /// Tokens one chunk holds (75 for CLIP).
    pub chunk_length: usize,
}

/// The chunking ids of `tokenizer`.
fn chunk_ids(tokenizer: &ClipTokenizer) -> ChunkIds {
    ChunkIds {
        length: tokenizer.max_length(),
        bos: tokenizer.bos_id(),
        eos: tokenizer.eos_id(),
        pad: tokenizer.pad_id(),
        comma: tokenizer.token_id(",</w>"),
    }
}

/// Counts a prompt's tokens per chunk as the pipeline splits it
/// ([`SdxlPipeline::prompt_counter`]): the first tokenizer and the embeddings' names.
#[derive(Debug, Clone)]
pub struct PromptCounter {
    tokenizer: ClipTokenizer,
    embeddings: Vec<EmbeddingTokens>,
}

impl PromptCounter {
    /// `prompt`'s tokens per chunk as `syntax` reads it: A1111's chunks (its
    /// extra-network tags removed), or plain text's one window, whose tokens past
    /// [`PromptTokens::chunk_length`] are cut off.
    pub fn count(&self, prompt: &str, syntax: PromptSyntax) -> Result<PromptTokens> {
        let chunk_length = self.tokenizer.max_length().saturating_sub(2);
        match syntax {
            PromptSyntax::A1111 => {
                let (text, _) = extract_extra_networks(prompt);
                let chunks = chunk_prompt(
                    &parse_prompt_attention(&text),
                    chunk_ids(&self.tokenizer),
                    &self.embeddings,
                    |t| self.tokenizer.tokens(t),
                )?;
                Ok(PromptTokens {
                    per_chunk: chunks.chunks.iter().map(|c| c.tokens).collect(),
                    total: chunks.token_count,
                    chunk_length,
                })
            }
            PromptSyntax::Plain => {
                let n = self.tokenizer.tokens(prompt)?.len();
                Ok(PromptTokens {
                    per_chunk: vec![n],
                    total: n,
                    chunk_length,
                })
            }
        }
    }
}

impl<B: FusedOps> SdxlPipeline<B> {
    /// Chunks `prompt` (A1111 syntax) for one encoder's tokenizer.
    fn chunk_for(&self, pieces: &[Piece], tokenizer: &ClipTokenizer) -> Result<Chunks> {
        let embeddings = (self.components.embeddings.iter())
            .map(|e| {
                Ok(EmbeddingTokens {
                    ids: tokenizer.tokens(&e.name)?,
                    vectors: e.vectors,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        chunk_prompt(pieces, chunk_ids(tokenizer), &embeddings, |t| {
            tokenizer.tokens(t)
        })
    }

    /// How `prompt` (A1111 syntax) is chunked for each encoder: what the encoders are
    /// given, ids, weights and embedding positions.
    pub fn prompt_chunks(&self, prompt: &str) -> Result<[Chunks; 2]> {
        let c = &self.components;
        let pieces = parse_prompt_attention(prompt);
        Ok([
            self.chunk_for(&pieces, &c.tokenizer)?,
            self.chunk_for(&pieces, &c.tokenizer_2)?,
        ])
    }

    /// How `prompt` (A1111 syntax, its extra-network tags removed) splits into chunks,
    /// for the first encoder (the two agree for SDXL): for showing `n/75` as A1111 does.
    pub fn prompt_tokens(&self, prompt: &str) -> Result<PromptTokens> {
        self.prompt_counter()?.count(prompt, PromptSyntax::A1111)
    }

    /// What counting a prompt's tokens needs, apart from the pipeline (a server counts
    /// while the model runs).
    pub fn prompt_counter(&self) -> Result<PromptCounter> {
        let tokenizer = self.components.tokenizer.clone();
        let embeddings = (self.components.embeddings.iter())
            .map(|e| {
                Ok(EmbeddingTokens {
                    ids: tokenizer.tokens(&e.name)?,
                    vectors: e.vectors,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PromptCounter {
            tokenizer,
            embeddings,
        })
    }

    /// One encoder on a chunked prompt: every chunk at once, embeddings inserted,
    /// emphasis applied per chunk.
    fn encode_chunks(
        &self,
        encoder: &ClipTextModel<B>,
        chunks: Chunks,
        vectors: impl Fn(&TextualInversion) -> &[f32],
        clip_skip: usize,
        pooled: bool,
    ) -> Result<Encoded<B>> {
        let k = chunks.chunks.len();
        let l = chunks.chunks.first().map_or(0, |c| c.ids.len());
        let width = encoder.config().hidden_size;
        let ids: Vec<i32> = (chunks.chunks.iter())
            .flat_map(|c| c.ids.iter().map(|&i| i as i32))
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [k, l]), &self.device);
        let mut inserts = Vec::new();
        for (row, chunk) in chunks.chunks.iter().enumerate() {
            for fix in &chunk.fixes {
                let ti = self
                    .components
                    .embeddings
                    .get(fix.embedding)
                    .ok_or_else(|| {
                        Error::Backend("a textual inversion the prompt named is gone".into())
                    })?;
                let data = vectors(ti).to_vec();
                if data.len() != fix.vectors * width {
                    return Err(Error::invalid(
                        "embedding",
                        format!(
                            "{}: {} values do not make {} vectors of width {width}",
                            ti.path.display(),
                            data.len(),
                            fix.vectors
                        ),
                    ));
                }
                inserts.push(TokenInsert {
                    row,
                    position: fix.position,
                    vectors: Tensor::from_data(
                        TensorData::new(data, [fix.vectors, width]),
                        &self.device,
                    ),
                });
            }
        }
        let out = encoder.forward_hidden(ids, &inserts, clip_skip, pooled)?;
        let z = out.penultimate;
        let dtype = z.dtype();
        let multipliers: Vec<f32> = (chunks.chunks.iter())
            .flat_map(|c| c.multipliers.iter().copied())
            .collect();
        let weighted = multipliers.iter().any(|&m| m != 1.0);
        let z = if weighted {
            // "Original" emphasis: weight every token's state, then restore each
            // chunk's mean over all its values.
            let m = Tensor::<B, 2>::from_data(TensorData::new(multipliers, [k, l]), &self.device)
                .cast(dtype)
                .unsqueeze_dim::<3>(2);
            let [_, _, c] = z.dims();
            let mean = |t: Tensor<B, 3>| t.reshape([k, l * c]).mean_dim(1).reshape([k, 1, 1]);
            let original = mean(z.clone());
            let z1 = z * m;
            let new = mean(z1.clone());
            z1 * (original / new)
        } else {
            // All weights 1: emphasis changes nothing (and keeps plain prompts exact).
            z
        };
        let [_, _, c] = z.dims();
        let hidden = z.reshape([1, k * l, c]);
        let pooled = match out.text_embeds {
            Some(p) => Some(p.narrow(0, 0, 1)),
            None if pooled => return Err(Error::Unsupported {
                path: self.components.info.component_path("text_encoder_2"),
                message:
                    "text_encoder_2 has no text_projection (SDXL needs CLIPTextModelWithProjection)"
                        .into(),
            }),
            None => None,
        };
        Ok(Encoded {
            hidden,
            pooled,
            chunks,
        })
    }

    /// Encodes one prompt in A1111's syntax with both encoders: `([1, 77·k, D1 + D2],
    /// [1, D])`, `k` its chunks.
    pub fn encode_text_a1111(
        &self,
        prompt: &str,
        clip_skip: usize,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
        let c = &self.components;
        let [chunks1, chunks2] = self.prompt_chunks(prompt)?;
        let shape = |ch: &Chunks| (ch.chunks.len(), ch.chunks.first().map(|c| c.ids.len()));
        if shape(&chunks1) != shape(&chunks2) {
            return Err(Error::Unsupported {
                path: c.info.component_path("tokenizer_2"),
                message: "the two tokenizers split the prompt into different chunks".into(),
            });
        }
        let e1 = self.encode_chunks(&c.text_encoder, chunks1, |t| &t.clip_l, clip_skip, false)?;
        let e2 = self.encode_chunks(&c.text_encoder_2, chunks2, |t| &t.clip_g, clip_skip, true)?;
        let pooled = e2
            .pooled
            .ok_or_else(|| Error::Backend("no pooled output".into()))?;
        debug_assert_eq!(e1.chunks.chunks.len(), e2.chunks.chunks.len());
        Ok((Tensor::cat(vec![e1.hidden, e2.hidden], 2), pooled))
    }
}
