//! The tokenizer and chat template a GGUF file carries in its metadata
//! (`tokenizer.ggml.*`, `tokenizer.chat_template`), built with the
//! `tokenizers` crate and rendered with `minijinja` as llama.cpp's Jinja mode
//! does.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::gguf::md_u32;

/// Values of `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer names) this node knows.
pub const SUPPORTED_PRE_TOKENIZERS: &str =
    "default, gpt2, smollm, starcoder, refact, command-r, codeshell, exaone, minerva, llama-bpe, llama3, qwen2, deepseek-r1-qwen";

/// llama.cpp's LLAMA3 pre-tokenizer regex.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's QWEN2 pre-tokenizer regex.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token texts llama.cpp also treats as end of generation when the vocabulary has them.
const EOG_TEXTS: [&str; 8] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
];

pub use donate_proto::ChatMessage;

/// Template steps (minijinja instructions, its "fuel") a render may take:
/// this much for the conversation, and [`FUEL_PER_MESSAGE`] more for each
/// message. Real templates take a few hundred per message; a runaway loop is
/// stopped within milliseconds.
pub const TEMPLATE_FUEL: u64 = 100_000;
/// Template steps added to [`TEMPLATE_FUEL`] for each message.
pub const FUEL_PER_MESSAGE: u64 = 10_000;
/// Bytes a rendered conversation may have, beyond
/// [`OUTPUT_PER_INPUT_BYTE`] for each byte of its messages and tokens.
pub const TEMPLATE_OUTPUT: usize = 1 << 20;
/// Bytes of rendered text allowed for each byte of the input.
pub const OUTPUT_PER_INPUT_BYTE: usize = 4;

/// The rendered text, refusing to grow past `limit` bytes.
struct Bounded {
    text: Vec<u8>,
    limit: usize,
    over: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len().saturating_add(buf.len()) > self.limit {
            self.over = true;
            return Err(std::io::Error::other(
                "the chat template's output is too large",
            ));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders a Hugging Face chat template (Jinja) as llama.cpp's Jinja mode
/// and `transformers` do: `trim_blocks` and `lstrip_blocks` on, Python string
/// methods (`.strip()`, `.split()`…) available, `raise_exception` defined, and
/// the variables `messages`, `add_generation_prompt`, `bos_token` and
/// `eos_token`. The template's own default system prompt, if it has one, is
/// kept: nothing is added or removed here.
///
/// The template is bounded, since a model file's template is code from
/// whoever made the file: it may take `TEMPLATE_FUEL` (100,000) steps plus
/// `FUEL_PER_MESSAGE` (10,000) per message, and write `TEMPLATE_OUTPUT`
/// (1 MiB) bytes plus `OUTPUT_PER_INPUT_BYTE` (4) per byte of the messages
/// and tokens; past
/// either it fails, naming which.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
    add_generation_prompt: bool,
) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    let fuel = TEMPLATE_FUEL.saturating_add(FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64));
    env.set_fuel(Some(fuel));
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    let tmpl = env
        .template_from_str(template)
        .map_err(|e| format!("the chat template does not parse: {e}"))?;
    let input = messages
        .iter()
        .map(|m| m.role.len() + m.content.len())
        .sum::<usize>()
        + bos_token.len()
        + eos_token.len();
    let limit = TEMPLATE_OUTPUT.saturating_add(input.saturating_mul(OUTPUT_PER_INPUT_BYTE));
    let mut out = Bounded {
        text: Vec::new(),
        limit,
        over: false,
    };
    let messages: Vec<minijinja::Value> = messages
        .iter()
        .map(|m| minijinja::context! { role => m.role, content => m.content })
        .collect();
    let rendered = tmpl.render_captured_to(
        minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        },
        &mut out,
    );
    match rendered {
        Ok(_) => String::from_utf8(out.text)
            .map_err(|_| "the chat template wrote text that is not UTF-8".to_owned()),
        Err(_) if out.over => Err(format!(
            "the model's chat template wrote more than {limit} bytes for {input} bytes of \
             messages, and was stopped; run with --raw-prompt to send prompts without it"
        )),
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(format!(
            "the model's chat template used more than {fuel} steps (a loop that runs away?), \
             and was stopped; run with --raw-prompt to send prompts without it"
        )),
        Err(e) => Err(format!("the chat template failed: {e}")),
    }
}

/// A GGUF file's tokenizer, special tokens and chat template.
pub(crate) struct GgufTokenizer {
    pub(crate) tokenizer: Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    bos_text: String,
    eos_text: String,
    template: Option<String>,
    /// End-of-generation ids: EOS, EOT and llama.cpp's end-of-turn texts.
    pub(crate) eog: Vec<u32>,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("bos", &self.bos)
            .field("add_bos", &self.add_bos)
            .field("eog", &self.eog)
            .field("chat_template", &self.template.is_some())
            .finish_non_exhaustive()
    }
}

fn strings<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>, String> {
    match md.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(format!(
                    "{key} holds a {:?}, not strings",
                    other.value_type()
                )),
            })
            .collect(),
        Some(other) => Err(format!("{key} is a {:?}, not an array", other.value_type())),
        None => Err(format!("the GGUF file lacks {key}")),
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer from the metadata of a model with `vocab_size` tokens.
    pub(crate) fn from_metadata(
        md: &HashMap<String, Value>,
        vocab_size: usize,
    ) -> Result<GgufTokenizer, String> {
        let model = match md.get("tokenizer.ggml.model") {
            Some(Value::String(m)) => m.as_str(),
            _ => return Err("the GGUF file has no tokenizer (tokenizer.ggml.model)".to_owned()),
        };
        let tokens = strings(md, "tokenizer.ggml.tokens")?;
        if tokens.len() > vocab_size {
            return Err(format!(
                "tokenizer.ggml.tokens has {} tokens, more than the model's {vocab_size}",
                tokens.len()
            ));
        }
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let (mut tokenizer, default_add_bos) = match model {
            "gpt2" => byte_level_bpe(md, &tokens)?,
            "llama" => (sentencepiece(md, &tokens, &types)?, true),
            other => {
                return Err(format!(
                    "unsupported GGUF tokenizer {other:?}: prompts need \"gpt2\" (byte-level BPE) \
                     or \"llama\" (SentencePiece); infer jobs with token ids do not need one"
                ))
            }
        };
        // Control (3) and user-defined (4) tokens are matched whole in the
        // text, as llama.cpp does with parse_special; control ones are
        // skipped when decoding.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            // Matched in the raw text: a SentencePiece normalizer must not
            // touch them, and the text after one starts a new segment.
            .map(|(text, &t)| AddedToken::from(*text, t == 3).normalized(false))
            .collect();
        tokenizer
            .add_special_tokens(specials)
            .map_err(|e| format!("cannot add the special tokens: {e}"))?;

        let id = |key: &str| md_u32(md, key).filter(|&id| (id as usize) < tokens.len());
        let text = |id: Option<u32>| {
            id.map(|id| tokens[id as usize].to_owned())
                .unwrap_or_default()
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            _ => default_add_bos,
        } && bos.is_some();
        let mut eog: Vec<u32> = [
            eos,
            id("tokenizer.ggml.eot_token_id"),
            id("tokenizer.ggml.eom_token_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            if (ty == 3 || ty == 4) && EOG_TEXTS.contains(t) && !eog.contains(&(i as u32)) {
                eog.push(i as u32);
            }
        }
        let template = match md.get("tokenizer.chat_template") {
            Some(Value::String(t)) if !t.trim().is_empty() => Some(t.clone()),
            _ => None,
        };
        Ok(GgufTokenizer {
            tokenizer,
            bos,
            add_bos,
            bos_text: text(bos),
            eos_text: text(eos),
            template,
            eog,
        })
    }

    /// Whether the file has a chat template.
    pub(crate) fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders the chat template, when there is one, for a one-line prompt
    /// as prompts will render it: a template that fails, runs away or writes
    /// too much is refused once, at load, instead of on every prompt.
    pub(crate) fn check_template(&self) -> Result<(), String> {
        self.prompt_text("Hello! Who are you?", true)
            .map(drop)
            .map_err(|e| {
                format!(
                    "its chat template (tokenizer.chat_template) does not render a sample prompt: {}",
                    e.replace('\n', " ")
                )
            })
    }

    /// The text a prompt becomes: the chat template rendered with one user
    /// message (`chat`, when there is a template), else the prompt as it is.
    pub(crate) fn prompt_text(&self, prompt: &str, chat: bool) -> Result<String, String> {
        match (&self.template, chat) {
            (Some(template), true) => render_chat_template(
                template,
                &[ChatMessage::new("user", prompt)],
                &self.bos_text,
                &self.eos_text,
                true,
            ),
            _ => Ok(prompt.to_owned()),
        }
    }

    /// The text a conversation becomes: the chat template rendered with
    /// `messages`, and the turn of the assistant begun.
    pub(crate) fn chat_text(&self, messages: &[ChatMessage]) -> Result<String, String> {
        match &self.template {
            Some(template) => {
                render_chat_template(template, messages, &self.bos_text, &self.eos_text, true)
            }
            None => Err(
                "the model has no chat template (tokenizer.chat_template): send the text as a raw prompt"
                    .to_owned(),
            ),
        }
    }

    /// Token ids of `text`, special tokens matched whole, with the BOS in
    /// front when the model wants one and the text does not start with it.
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }
}

/// A byte-level BPE tokenizer (`tokenizer.ggml.model` `gpt2`) from the
/// vocabulary, merges and pre-tokenizer name, and whether llama.cpp adds a BOS
/// by default (for llama3's BPE only).
fn byte_level_bpe(
    md: &HashMap<String, Value>,
    tokens: &[&str],
) -> Result<(Tokenizer, bool), String> {
    let merges = strings(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| format!("tokenizer.ggml.merges holds {m:?}, not \"a b\""))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let pre = match md.get("tokenizer.ggml.pre") {
        Some(Value::String(p)) => p.as_str(),
        _ => "default",
    };
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
    let split = |regex: &str| -> Result<PreTokenizerWrapper, String> {
        let pattern = SplitPattern::Regex(regex.to_owned());
        Split::new(pattern, SplitDelimiterBehavior::Isolated, false)
            .map(Into::into)
            .map_err(|e| format!("pre-tokenizer regex: {e}"))
    };
    let (pre_tokenizer, ignore_merges): (PreTokenizerWrapper, bool) = match pre {
        "default" | "gpt2" => (byte_level(true).into(), false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => (
            Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into(),
            false,
        ),
        "llama-bpe" | "llama3" | "llama-v3" => (
            Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false).into()]).into(),
            true,
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            Sequence::new(vec![split(QWEN2_REGEX)?, byte_level(false).into()]).into(),
            false,
        ),
        other => {
            return Err(format!(
            "unsupported GGUF pre-tokenizer {other:?}: this node knows {SUPPORTED_PRE_TOKENIZERS}"
        ))
        }
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t).to_owned(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| format!("cannot build the BPE tokenizer: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // llama.cpp: a BOS by default for llama3's BPE, not for other BPE.
    Ok((tokenizer, ignore_merges))
}

/// A SentencePiece tokenizer (`tokenizer.ggml.model` `llama`: Llama 2,
/// Mistral, TinyLlama…) as llama.cpp runs it: spaces become `▁` with one in
/// front of the text and after each special token (`add_space_prefix`), the
/// adjacent pair whose joined piece scores highest is merged first, and
/// characters outside the vocabulary become `<0xNN>` byte tokens. Built as a
/// BPE whose merges are ranked by the joined piece's score, as `transformers`
/// converts these models.
/// Most work [`sentencepiece`] spends finding merges, as the sum over the
/// pieces of their squared lengths in bytes: the largest vocabularies in use
/// (256k pieces, a few of a hundred bytes) need tens of millions.
const MAX_MERGE_WORK: u64 = 1 << 30;

fn sentencepiece(
    md: &HashMap<String, Value>,
    tokens: &[&str],
    types: &[i64],
) -> Result<Tokenizer, String> {
    let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
        Some(Value::Array(items)) if items.len() == tokens.len() => items
            .iter()
            .map(|v| {
                v.to_f32()
                    .map_err(|_| "tokenizer.ggml.scores holds a non-float".to_owned())
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(
                "a SentencePiece GGUF needs tokenizer.ggml.scores, one per token".to_owned(),
            )
        }
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t).to_owned(), i as u32))
        .collect();
    // Every way a piece splits into two pieces, the best-scoring piece's first
    // (llama.cpp merges whatever pair forms a piece; byte and unknown tokens
    // are never formed).
    // Each piece costs its length squared (every split point, each side
    // hashed): bounded, so a hostile vocabulary (one piece of megabytes)
    // is refused at once instead of taking hours.
    let work: u64 = tokens
        .iter()
        .map(|t| (t.len() as u64).saturating_mul(t.len() as u64))
        .fold(0, u64::saturating_add);
    if work > MAX_MERGE_WORK {
        let longest = tokens.iter().map(|t| t.len()).max().unwrap_or(0);
        return Err(format!(
            "the SentencePiece vocabulary's pieces are too long to build its merges \
             (the longest is {longest} bytes; the sum of their squared lengths is {work}, at most {MAX_MERGE_WORK})"
        ));
    }
    let mut ranked: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if matches!(types.get(id), Some(2 | 6)) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(at);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                ranked.push((scores[id], id as u32, a.to_owned(), b.to_owned()));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let merges = ranked.into_iter().map(|(_, _, a, b)| (a, b)).collect();
    let unk = md_u32(md, "tokenizer.ggml.unknown_token_id")
        .or_else(|| types.iter().position(|&t| t == 2).map(|i| i as u32))
        .and_then(|id| tokens.get(id as usize));
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token((*unk).to_owned());
    }
    let bpe = builder
        .build()
        .map_err(|e| format!("cannot build the SentencePiece tokenizer: {e}"))?;
    let space_prefix = !matches!(
        md.get("tokenizer.ggml.add_space_prefix"),
        Some(Value::Bool(false))
    );
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ")
            .map_err(|e| format!("decoder: {e}"))?
            .into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if space_prefix {
        normalizers.push(Prepend::new("\u{2581}".to_owned()).into());
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    normalizers.push(
        Replace::new(" ", "\u{2581}")
            .map_err(|e| format!("normalizer: {e}"))?
            .into(),
    );
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| format!("cannot set the SentencePiece normalizer: {e}"))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template (ChatML with a default system prompt).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Llama 3's template (Meta-Llama-3-8B-Instruct), with its blocks on their own lines.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    /// A qwen2-style template using Python string methods and raise_exception,
    /// with block tags on their own lines (trim_blocks / lstrip_blocks matter).
    const QWEN_STYLE: &str = "{% for message in messages %}
    {% if message.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' + message.role) }}
    {% endif %}
    {% if loop.first and message.role != 'system' %}
<|im_start|>system
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message.role }}
{{ message.content.strip() }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}";

    /// llama.cpp's ids (special tokens parsed, no BOS) for the cases of
    /// tests/data/spm_vocab.json, recorded by tests/data/spm_record.py.
    const SPM_IDS: [(&str, &[u32]); 7] = [
        ("the cat sat on the mat", &[264, 270, 272, 276, 264, 279]),
        ("Hello, world!", &[304, 315, 313, 314]),
        ("banana caf\u{e9} \u{2603}", &[288, 293, 259, 229, 155, 134]),
        (
            "  two  spaces",
            &[316, 260, 307, 273, 259, 271, 115, 267, 280, 262, 281],
        ),
        ("<s>the cat</s>the mat", &[1, 264, 270, 2, 264, 279]),
        ("hello<|im_end|>\nworld", &[301, 319, 259, 317, 307, 312]),
        ("", &[]),
    ];

    /// The metadata of a vocab-only SentencePiece GGUF for spm_vocab.json,
    /// laid out as spm_record.py writes it.
    fn spm_metadata() -> HashMap<String, Value> {
        let spec: serde_json::Value =
            serde_json::from_str(include_str!("../tests/data/spm_vocab.json")).unwrap();
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        let mut scores = vec![0.0f32; 3];
        let mut types = vec![2, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            types.push(6);
        }
        for piece in spec["pieces"].as_array().unwrap() {
            tokens.push(piece[0].as_str().unwrap().to_owned());
            scores.push(piece[1].as_f64().unwrap() as f32);
            types.push(1);
        }
        for special in spec["special"].as_array().unwrap() {
            tokens.push(special.as_str().unwrap().to_owned());
            scores.push(0.0);
            types.push(4);
        }
        let cases: Vec<&str> = spec["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cases, SPM_IDS.map(|(text, _)| text), "the recorded cases");
        HashMap::from([
            (
                "tokenizer.ggml.model".to_owned(),
                Value::String("llama".to_owned()),
            ),
            (
                "tokenizer.ggml.tokens".to_owned(),
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.scores".to_owned(),
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type".to_owned(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.unknown_token_id".to_owned(), Value::U32(0)),
            ("tokenizer.ggml.bos_token_id".to_owned(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(2)),
        ])
    }

    #[test]
    fn sentencepiece_tokenizes_as_llama_cpp_does() {
        let md = spm_metadata();
        let spm = GgufTokenizer::from_metadata(&md, 400).unwrap();
        for (text, ids) in SPM_IDS {
            let got = spm
                .tokenizer
                .encode(text, false)
                .unwrap()
                .get_ids()
                .to_vec();
            assert_eq!(got, ids, "{text:?}");
        }
        // A BOS by default for SentencePiece, once.
        assert_eq!(spm.encode("the cat").unwrap(), [1, 264, 270]);
        assert_eq!(spm.encode("<s>the cat").unwrap(), [1, 264, 270]);
        // Decoding gives the text back (no leading space, bytes fused).
        let ids = spm
            .tokenizer
            .encode("banana caf\u{e9} \u{2603}", false)
            .unwrap();
        let text = spm.tokenizer.decode(ids.get_ids(), true).unwrap();
        assert_eq!(text, "banana caf\u{e9} \u{2603}");
    }

    #[test]
    fn a_vocabulary_of_huge_pieces_is_refused_at_once() {
        // One piece of 1 MiB: finding its merges split by split would take
        // about 10^12 byte operations (hours).
        let mut md = spm_metadata();
        for (key, value) in [
            ("tokenizer.ggml.tokens", Value::String("a".repeat(1 << 20))),
            ("tokenizer.ggml.scores", Value::F32(-1.0)),
            ("tokenizer.ggml.token_type", Value::I32(1)),
        ] {
            let Some(Value::Array(items)) = md.get_mut(key) else {
                panic!("{key}")
            };
            items.push(value);
        }
        let e = GgufTokenizer::from_metadata(&md, 500).unwrap_err();
        assert!(e.contains("1048576 bytes"), "{e}");
    }

    #[test]
    fn an_unknown_tokenizer_is_refused_naming_the_supported_ones() {
        let mut md = spm_metadata();
        md.insert(
            "tokenizer.ggml.model".to_owned(),
            Value::String("rwkv".to_owned()),
        );
        let e = GgufTokenizer::from_metadata(&md, 400).unwrap_err();
        assert!(e.contains("\"rwkv\"") && e.contains("SentencePiece"), "{e}");
        md.insert(
            "tokenizer.ggml.model".to_owned(),
            Value::String("llama".to_owned()),
        );
        md.remove("tokenizer.ggml.scores");
        let e = GgufTokenizer::from_metadata(&md, 400).unwrap_err();
        assert!(e.contains("tokenizer.ggml.scores"), "{e}");
    }

    #[test]
    fn smollm2_chatml_with_its_default_system_prompt() {
        let text = render_chat_template(
            SMOLLM2,
            &[ChatMessage::new("user", "What is the capital of France?")],
            "<|im_start|>",
            "<|im_end|>",
            true,
        )
        .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        // A system message of the caller's replaces the default one.
        let text = render_chat_template(
            SMOLLM2,
            &[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
            ],
            "<|im_start|>",
            "<|im_end|>",
            false,
        )
        .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_puts_the_bos_text_first() {
        let text = render_chat_template(
            LLAMA3,
            &[ChatMessage::new("user", "  Hello  ")],
            "<|begin_of_text|>",
            "<|eot_id|>",
            true,
        )
        .unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn python_methods_trimmed_blocks_and_raise_exception() {
        let text = render_chat_template(
            QWEN_STYLE,
            &[ChatMessage::new("user", "  2+2?\n")],
            "",
            "<|im_end|>",
            true,
        )
        .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        let err = render_chat_template(QWEN_STYLE, &[ChatMessage::new("tool", "x")], "", "", true)
            .unwrap_err();
        assert!(err.contains("bad role tool"), "{err}");
        assert!(render_chat_template("{% for %}", &[], "", "", true)
            .unwrap_err()
            .contains("does not parse"));
    }

    /// A loop of 10^10 steps that writes nothing.
    const NESTED_LOOP: &str =
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}ok";

    /// 100 GB of output, a megabyte at a time.
    const HUGE_OUTPUT: &str = "{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}";

    fn render_user(template: &str, prompt: &str) -> Result<String, String> {
        render_chat_template(template, &[ChatMessage::new("user", prompt)], "", "", true)
    }

    #[test]
    fn a_runaway_loop_is_stopped_naming_its_steps() {
        let started = std::time::Instant::now();
        let e = render_user(NESTED_LOOP, "hi").unwrap_err();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(
            e.contains("chat template used more than 110000 steps") && e.contains("--raw-prompt"),
            "{e}"
        );
        // Bounded even inside a macro and a filter.
        let e = render_user(
            "{% macro spin() %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endmacro %}{{ spin() | upper }}",
            "hi",
        )
        .unwrap_err();
        assert!(e.contains("steps"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn huge_output_is_stopped_naming_its_size() {
        let started = std::time::Instant::now();
        let e = render_user(HUGE_OUTPUT, "hi").unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let limit = TEMPLATE_OUTPUT + OUTPUT_PER_INPUT_BYTE * "userhi".len();
        assert!(
            e.contains(&format!(
                "chat template wrote more than {limit} bytes for 6 bytes"
            )),
            "{e}"
        );
        // The bound grows with the input: a long prompt still renders whole.
        let long = "y".repeat(3 << 20);
        let text = render_user(SMOLLM2, &long).unwrap();
        assert!(text.contains(&long) && text.ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn a_template_is_checked_once_at_load() {
        let mut md = spm_metadata();
        let mut load = |template: &str| {
            md.insert(
                "tokenizer.chat_template".to_owned(),
                Value::String(template.to_owned()),
            );
            GgufTokenizer::from_metadata(&md, 400)
                .unwrap()
                .check_template()
        };
        load(SMOLLM2).unwrap();
        load(QWEN_STYLE).unwrap();
        let started = std::time::Instant::now();
        let e = load(NESTED_LOOP).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(
            e.starts_with("its chat template (tokenizer.chat_template) does not render a sample prompt: the model's chat template used more than"),
            "{e}"
        );
        assert!(load(HUGE_OUTPUT).unwrap_err().contains("wrote more than"));
        let e = load("{{ raise_exception('no\nway') }}").unwrap_err();
        assert!(e.contains("no way") && !e.contains('\n'), "{e}");
        assert!(load("{% for %}").unwrap_err().contains("does not parse"));
    }
}
