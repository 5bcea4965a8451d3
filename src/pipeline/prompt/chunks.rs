//! A1111's chunking of a parsed prompt (`sd_hijack_clip.py`, `tokenize_line`): tokens in
//! chunks of `max_length - 2` (75 for CLIP), each framed by BOS and EOS, with comma
//! backtracking, `BREAK`s, and textual-inversion embeddings kept whole.

use super::parse::Piece;

/// How far back (in tokens) a comma may be for the text after it to move to the next
/// chunk: A1111's `comma_padding_backtrack` setting, at its default.
pub const COMMA_BACKTRACK: usize = 20;

/// The ids of one tokenizer that chunking needs.
#[derive(Debug, Clone, Copy)]
pub struct ChunkIds {
    /// Ids per chunk, BOS and EOS included (the tokenizer's `model_max_length`, 77).
    pub length: usize,
    /// Beginning of text.
    pub bos: u32,
    /// End of text.
    pub eos: u32,
    /// What fills a chunk after its first EOS: EOS itself for CLIP ViT-L, `!` (0) for
    /// OpenCLIP bigG (A1111: `id_pad`).
    pub pad: u32,
    /// The id of `,` (`,</w>`), `None` to turn backtracking off.
    pub comma: Option<u32>,
}

/// A textual-inversion embedding as chunking sees it: the token ids of its name and how
/// many vectors replace them.
#[derive(Debug, Clone)]
pub struct EmbeddingTokens {
    /// The ids of the file's stem, as this tokenizer splits it.
    pub ids: Vec<u32>,
    /// Vectors it inserts.
    pub vectors: usize,
}

/// Where an embedding's vectors go in a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fix {
    /// Index in [`Chunk::ids`] (BOS is 0) of its first vector.
    pub position: usize,
    /// Which embedding (its index in the list chunking was given).
    pub embedding: usize,
    /// Vectors it inserts.
    pub vectors: usize,
}

/// One chunk, ready for a text encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// `[BOS] + tokens + [EOS]`, then pad ids: exactly [`ChunkIds::length`] ids.
    /// Embedding vectors sit on placeholder ids 0.
    pub ids: Vec<u32>,
    /// One weight per id (1 on BOS, EOS and padding), as float32 as A1111 makes them.
    pub multipliers: Vec<f32>,
    /// The embeddings to insert.
    pub fixes: Vec<Fix>,
    /// Tokens of the prompt in it (BOS, EOS and padding not counted).
    pub tokens: usize,
}

/// A prompt in chunks.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunks {
    /// At least one.
    pub chunks: Vec<Chunk>,
    /// A1111's token count: a full chunk's worth for every chunk but the last, plus the
    /// last chunk's tokens (what its UI shows as `n/75`).
    pub token_count: usize,
}

/// The chunk being filled: tokens and weights without BOS and EOS.
#[derive(Default)]
struct Open {
    tokens: Vec<u32>,
    multipliers: Vec<f64>,
    fixes: Vec<(usize, usize, usize)>,
}

/// The longest embedding whose ids start `tokens` at `at` (A1111 tries the longest first).
/// One with no vectors, or more than a chunk holds, is never matched (its name is text).
fn embedding_at(
    tokens: &[u32],
    at: usize,
    embeddings: &[EmbeddingTokens],
    chunk_length: usize,
) -> Option<usize> {
    embeddings
        .iter()
        .enumerate()
        .filter(|(_, e)| (1..=chunk_length).contains(&e.vectors))
        .filter(|(_, e)| !e.ids.is_empty() && tokens[at..].starts_with(&e.ids))
        .max_by_key(|(i, e)| (e.ids.len(), std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
}

/// Chunks `pieces` (each tokenized on its own by `tokenize`, without BOS or EOS) as
/// A1111 does.
pub fn chunk_prompt<E>(
    pieces: &[Piece],
    ids: ChunkIds,
    embeddings: &[EmbeddingTokens],
    mut tokenize: impl FnMut(&str) -> Result<Vec<u32>, E>,
) -> Result<Chunks, E> {
    let chunk_length = ids.length.saturating_sub(2).max(1);
    let mut chunks = Vec::new();
    let mut chunk = Open::default();
    let mut token_count = 0;
    let mut last_comma: Option<usize> = None;

    let close = |chunk: &mut Open, chunks: &mut Vec<Chunk>, last: bool, count: &mut usize| {
        let open = std::mem::take(chunk);
        let n = open.tokens.len();
        *count += if last { n } else { chunk_length };
        let mut out = Vec::with_capacity(ids.length);
        out.push(ids.bos);
        out.extend(&open.tokens);
        out.resize(chunk_length + 2, ids.eos);
        // Everything after the first EOS becomes the pad id (a no-op when they agree).
        if let Some(first) = out.iter().position(|&t| t == ids.eos) {
            for t in &mut out[first + 1..] {
                *t = ids.pad;
            }
        }
        let mut multipliers = Vec::with_capacity(out.len());
        multipliers.push(1.0f32);
        multipliers.extend(open.multipliers.iter().map(|&m| m as f32));
        multipliers.resize(out.len(), 1.0);
        chunks.push(Chunk {
            ids: out,
            multipliers,
            fixes: (open.fixes.iter())
                .map(|&(offset, embedding, vectors)| Fix {
                    position: offset + 1,
                    embedding,
                    vectors,
                })
                .collect(),
            tokens: n,
        });
    };

    for piece in pieces {
        if piece.is_break() {
            close(&mut chunk, &mut chunks, false, &mut token_count);
            last_comma = None;
            continue;
        }
        let tokens = tokenize(&piece.text)?;
        let weight = piece.weight;
        let mut position = 0;
        while position < tokens.len() {
            let token = tokens[position];
            if Some(token) == ids.comma {
                last_comma = Some(chunk.tokens.len());
            } else if let Some(comma) = last_comma.filter(|&c| {
                ids.comma.is_some()
                    && COMMA_BACKTRACK != 0
                    && chunk.tokens.len() == chunk_length
                    && chunk.tokens.len() - c <= COMMA_BACKTRACK
            }) {
                // A full chunk and no comma here: the words after the last comma move on.
                let at = comma + 1;
                let tokens_moved = chunk.tokens.split_off(at);
                let multipliers_moved = chunk.multipliers.split_off(at);
                // Embeddings move with their placeholders (A1111 leaves them behind,
                // pointing into the closed chunk's padding: a bug not copied).
                let (fixes_kept, fixes_moved): (Vec<_>, Vec<_>) =
                    chunk.fixes.drain(..).partition(|f| f.0 < at);
                chunk.fixes = fixes_kept;
                close(&mut chunk, &mut chunks, false, &mut token_count);
                chunk.tokens = tokens_moved;
                chunk.multipliers = multipliers_moved;
                chunk.fixes = (fixes_moved.into_iter())
                    .map(|(offset, e, v)| (offset - at, e, v))
                    .collect();
                last_comma = None;
            }
            if chunk.tokens.len() == chunk_length {
                close(&mut chunk, &mut chunks, false, &mut token_count);
                last_comma = None;
            }
            let Some(e) = embedding_at(&tokens, position, embeddings, chunk_length) else {
                chunk.tokens.push(token);
                chunk.multipliers.push(weight);
                position += 1;
                continue;
            };
            let vectors = embeddings[e].vectors;
            if chunk.tokens.len() + vectors > chunk_length {
                close(&mut chunk, &mut chunks, false, &mut token_count);
                last_comma = None;
            }
            chunk.fixes.push((chunk.tokens.len(), e, vectors));
            chunk.tokens.extend(std::iter::repeat_n(0, vectors));
            chunk
                .multipliers
                .extend(std::iter::repeat_n(weight, vectors));
            position += embeddings[e].ids.len();
        }
    }
    if !chunk.tokens.is_empty() || chunks.is_empty() {
        close(&mut chunk, &mut chunks, true, &mut token_count);
    }
    Ok(Chunks {
        chunks,
        token_count,
    })
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::pipeline::prompt::parse_prompt_attention;

    const IDS: ChunkIds = ChunkIds {
        length: 77,
        bos: 49406,
        eos: 49407,
        pad: 0,
        comma: Some(267),
    };

    /// A stand-in tokenizer: one id per character, `,` the comma.
    fn tokenize(text: &str) -> Result<Vec<u32>, ()> {
        Ok(text
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| {
                if c == ',' {
                    267
                } else {
                    300 + (c as u32 % 1000)
                }
            })
            .collect())
    }

    proptest! {
        #![proptest_config(crate::load::properties::config())]

        /// Any text parses and chunks without panicking: every chunk is framed by BOS
        /// and EOS at full length, with one weight per id, and holds at most 75 tokens;
        /// no token is lost or invented.
        #[test]
        fn any_prompt_chunks(text in "[a-z ,()\\[\\]:.0-9\\\\]{0,400}|\\PC{0,60}") {
            let pieces = parse_prompt_attention(&text);
            prop_assert!(!pieces.is_empty());
            let embeddings = [EmbeddingTokens { ids: vec![300 + ('a' as u32)], vectors: 3 }];
            let chunks = chunk_prompt(&pieces, IDS, &embeddings, tokenize).expect("chunks");
            prop_assert!(!chunks.chunks.is_empty());
            for c in &chunks.chunks {
                prop_assert_eq!(c.ids.len(), 77);
                prop_assert_eq!(c.multipliers.len(), 77);
                prop_assert_eq!(c.ids[0], IDS.bos);
                prop_assert!(c.tokens <= 75);
                prop_assert!(c.ids[1 + c.tokens] == IDS.eos);
                for f in &c.fixes {
                    prop_assert!(f.position + f.vectors <= 1 + c.tokens);
                }
            }
            let pieces_tokens: usize = pieces
                .iter()
                .filter(|p| !p.is_break())
                .map(|p| {
                    let t = tokenize(&p.text).unwrap_or_default();
                    // Each `a` becomes 3 vectors.
                    t.len() + 2 * t.iter().filter(|&&i| i == 300 + 'a' as u32).count()
                })
                .sum();
            let chunked: usize = chunks.chunks.iter().map(|c| c.tokens).sum();
            prop_assert_eq!(chunked, pieces_tokens);
        }

        /// Extra-network tags come out whole: each from its own `<`, its text gone.
        #[test]
        fn any_prompt_extra_networks(text in "[a-z<>:_ 0-9.]{0,80}|\\PC{0,40}") {
            let (left, tags) = crate::pipeline::prompt::extract_extra_networks(&text);
            let tag_chars: usize = tags
                .iter()
                .map(|t| t.kind.len() + t.args.iter().map(|a| a.len() + 1).sum::<usize>() + 2)
                .sum();
            prop_assert_eq!(left.len() + tag_chars, text.len());
            prop_assert!(tags.len() <= text.matches('<').count());
            for t in tags {
                prop_assert!(!t.kind.is_empty() && !t.args.is_empty());
            }
        }
    }
}
