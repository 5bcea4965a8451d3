//! AUTOMATIC1111's prompt parser (`modules/prompt_parser.py`, `parse_prompt_attention`),
//! rewritten: the same pieces and weights (float64 products in A1111's order) for every
//! input, and never an error.
//!
//! `(x)` multiplies x's weight by 1.1, `[x]` divides it by 1.1, `(x:w)` multiplies it by
//! w; nesting multiplies. `\(` `\)` `\[` `\]` `\\` are the literal characters, a `\`
//! before anything else vanishes. Brackets still open at the end are closed there; an
//! unmatched `)` or `]` is text. `BREAK` (the word, in capitals) is a chunk break.
//! Neighbouring pieces of equal weight are merged.

/// The text of the piece that stands for `BREAK`, as A1111 writes it.
pub const BREAK_TEXT: &str = "BREAK";
/// The weight of the piece that stands for `BREAK`. A1111 marks breaks as ordinary
/// pieces (`["BREAK", -1]`), so a break inside brackets (`(a BREAK b)`) gets a weight
/// other than -1 and is then read as the text "BREAK"; kept so, to agree with it.
pub const BREAK_WEIGHT: f64 = -1.0;

const ROUND: f64 = 1.1;
const SQUARE: f64 = 1.0 / 1.1;

/// One piece of a parsed prompt: text and its weight. A chunk break is the piece
/// ([`BREAK_TEXT`], [`BREAK_WEIGHT`]) (see [`Piece::is_break`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The text, escapes resolved.
    pub text: String,
    /// Its attention weight (1.0 when unweighted).
    pub weight: f64,
}

impl Piece {
    /// Whether this piece is a chunk break, as A1111 tells: the text `BREAK` at weight
    /// exactly -1.
    pub fn is_break(&self) -> bool {
        self.text == BREAK_TEXT && self.weight == BREAK_WEIGHT
    }
}

/// One token of A1111's attention grammar (its `re_attention`).
enum Token<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` (the character) or a lone `\` (nothing).
    Escaped(&'a str),
    Open,
    OpenSquare,
    /// `:w)` with its number's text, and the whole match (text when no `(` is open).
    Weight(&'a str, &'a str),
    Close,
    CloseSquare,
    /// Anything else: a run of ordinary characters, or a lone `:`.
    Text(&'a str),
}

/// The length of `:\s*([+-]?[.\d]+)\s*\)` at the start of `s`, and the number's span.
fn weight_at(s: &str) -> Option<(usize, std::ops::Range<usize>)> {
    let b = s.as_bytes();
    let mut i = 1; // the ':'
    let skip_ws = |mut i: usize| {
        while let Some(c) = s[i..].chars().next().filter(|c| c.is_whitespace()) {
            i += c.len_utf8();
        }
        i
    };
    i = skip_ws(i);
    let start = i;
    if matches!(b.get(i), Some(b'+' | b'-')) {
        i += 1;
    }
    let digits = i;
    while matches!(b.get(i), Some(b'.' | b'0'..=b'9')) {
        i += 1;
    }
    if i == digits {
        return None;
    }
    let end = i;
    i = skip_ws(i);
    (b.get(i) == Some(&b')')).then_some((i + 1, start..end))
}

/// Splits `text` into A1111's tokens, in order.
fn tokens(text: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let (token, len) = match c {
            '\\' => match rest[1..].chars().next() {
                Some(e @ ('(' | ')' | '[' | ']' | '\\')) => {
                    (Token::Escaped(&rest[1..2]), 1 + e.len_utf8())
                }
                _ => (Token::Escaped(""), 1),
            },
            '(' => (Token::Open, 1),
            '[' => (Token::OpenSquare, 1),
            ')' => (Token::Close, 1),
            ']' => (Token::CloseSquare, 1),
            ':' => match weight_at(rest) {
                Some((len, number)) => (Token::Weight(&rest[number], &rest[..len]), len),
                None => (Token::Text(":"), 1),
            },
            _ => {
                let len = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                (Token::Text(&rest[..len]), len)
            }
        };
        out.push(token);
        rest = &rest[len..];
    }
    out
}

/// Python's `\w` for a `str`: alphanumerics and the underscore.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`: the text between breaks.
fn split_breaks(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut from = 0; // where the current part starts
    let mut search = 0;
    while let Some(found) = text[search..].find(BREAK_TEXT) {
        let at = search + found;
        let end = at + BREAK_TEXT.len();
        let before_ok = !text[..at].chars().next_back().is_some_and(is_word);
        let after_ok = !text[end..].chars().next().is_some_and(is_word);
        if !(before_ok && after_ok) {
            search = at + 1;
            continue;
        }
        // The match takes the whitespace on both sides (but not what an earlier match took).
        let trimmed = text[from..at].trim_end_matches(char::is_whitespace);
        parts.push(&text[from..from + trimmed.len()]);
        let after = &text[end..];
        from = end + (after.len() - after.trim_start_matches(char::is_whitespace).len());
        search = from;
    }
    parts.push(&text[from..]);
    parts
}

/// Parses `text` as A1111's `parse_prompt_attention` does: the pieces with their
/// weights, breaks as [`Piece::is_break`] pieces; `[("", 1.0)]` for an empty result.
pub fn parse_prompt_attention(text: &str) -> Vec<Piece> {
    let mut res: Vec<Piece> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Piece>, from: usize, by: f64| {
        for p in &mut res[from..] {
            p.weight *= by;
        }
    };
    let push_text = |res: &mut Vec<Piece>, text: &str| {
        for (i, part) in split_breaks(text).into_iter().enumerate() {
            if i > 0 {
                res.push(Piece {
                    text: BREAK_TEXT.into(),
                    weight: BREAK_WEIGHT,
                });
            }
            res.push(Piece {
                text: part.into(),
                weight: 1.0,
            });
        }
    };
    for token in tokens(text) {
        match token {
            Token::Escaped(c) => res.push(Piece {
                text: c.into(),
                weight: 1.0,
            }),
            Token::Open => round.push(res.len()),
            Token::OpenSquare => square.push(res.len()),
            Token::Weight(number, whole) => {
                // A1111 raises on a number Python cannot read (`(a:1.2.3)`); hypergen
                // never fails on syntax and reads the whole `:…)` as text instead.
                match (round.last(), number.parse::<f64>()) {
                    (Some(_), Ok(w)) => {
                        if let Some(from) = round.pop() {
                            multiply(&mut res, from, w);
                        }
                    }
                    _ => push_text(&mut res, whole),
                }
            }
            Token::Close => match round.pop() {
                Some(from) => multiply(&mut res, from, ROUND),
                None => push_text(&mut res, ")"),
            },
            Token::CloseSquare => match square.pop() {
                Some(from) => multiply(&mut res, from, SQUARE),
                None => push_text(&mut res, "]"),
            },
            Token::Text(t) => push_text(&mut res, t),
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push(Piece {
            text: String::new(),
            weight: 1.0,
        });
    }
    // Merge runs of equal weight (a break merges with a neighbour of weight -1, as there).
    let mut merged: Vec<Piece> = Vec::with_capacity(res.len());
    for p in res {
        match merged.last_mut() {
            Some(last) if last.weight == p.weight => last.text.push_str(&p.text),
            _ => merged.push(p),
        }
    }
    merged
}

/// An extra-network tag of a prompt, `<KIND:ARG:…>` (A1111's `<lora:NAME:WEIGHT>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraNetwork {
    /// What it names: `lora`, `hypernet`, …
    pub kind: String,
    /// Its arguments, split at `:` (a LoRA's name, then its weight).
    pub args: Vec<String>,
}

/// The prompt without its extra-network tags, and the tags, as A1111 finds them
/// (`<(\w+):([^>]+)>`, removed from the text whatever their kind).
pub fn extract_extra_networks(prompt: &str) -> (String, Vec<ExtraNetwork>) {
    let mut text = String::with_capacity(prompt.len());
    let mut found = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let kind_len = after.len() - after.trim_start_matches(is_word).len();
        let tag = (kind_len > 0 && after[kind_len..].starts_with(':'))
            .then(|| &after[kind_len + 1..])
            .and_then(|args| args.find('>').filter(|&end| end > 0).map(|end| (args, end)));
        match tag {
            Some((args, end)) => {
                text.push_str(&rest[..open]);
                found.push(ExtraNetwork {
                    kind: after[..kind_len].to_string(),
                    args: args[..end].split(':').map(str::to_string).collect(),
                });
                rest = &args[end + 1..];
            }
            None => {
                text.push_str(&rest[..open + 1]);
                rest = after;
            }
        }
    }
    text.push_str(rest);
    (text, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(text)
            .into_iter()
            .map(|p| (p.text, p.weight))
            .collect()
    }

    fn pieces(list: &[(&str, f64)]) -> Vec<(String, f64)> {
        list.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    /// A1111's own doctest examples of `parse_prompt_attention`.
    #[test]
    fn a1111_doctests() {
        assert_eq!(parsed("normal text"), pieces(&[("normal text", 1.0)]));
        assert_eq!(
            parsed("an (important) word"),
            pieces(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(parsed("(unbalanced"), pieces(&[("unbalanced", 1.1)]));
        assert_eq!(parsed("\\(literal\\]"), pieces(&[("(literal]", 1.0)]));
        assert_eq!(
            parsed("(unnecessary)(parens)"),
            pieces(&[("unnecessaryparens", 1.1)])
        );
        assert_eq!(
            parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            pieces(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    #[test]
    fn extra_networks() {
        let (text, found) =
            extract_extra_networks("a <lora:pixel art:0.8> cat <x> <:a> <hypernet:h>, <lora:b>");
        assert_eq!(text, "a  cat <x> <:a> , ");
        assert_eq!(
            found,
            vec![
                ExtraNetwork {
                    kind: "lora".into(),
                    args: vec!["pixel art".into(), "0.8".into()]
                },
                ExtraNetwork {
                    kind: "hypernet".into(),
                    args: vec!["h".into()]
                },
                ExtraNetwork {
                    kind: "lora".into(),
                    args: vec!["b".into()]
                },
            ]
        );
        assert_eq!(extract_extra_networks("<lora:>").1, vec![]);
        assert_eq!(extract_extra_networks("a < b <c:d").0, "a < b <c:d");
    }

    #[test]
    fn breaks_and_escapes() {
        assert_eq!(
            parsed("a BREAK BREAK b"),
            pieces(&[
                ("a", 1.0),
                ("BREAK", -1.0),
                ("", 1.0),
                ("BREAK", -1.0),
                ("b", 1.0)
            ])
        );
        assert_eq!(
            parsed("a BREAKING news"),
            pieces(&[("a BREAKING news", 1.0)])
        );
        assert_eq!(parsed("(a:1.2.3)"), pieces(&[("a:1.2.3)", 1.1)]));
        assert_eq!(parsed("x:2) y"), pieces(&[("x:2) y", 1.0)]));
    }
}
