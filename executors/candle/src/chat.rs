//! The tokenizer and chat template a GGUF file carries in its metadata
//! (`tokenizer.ggml.*`, `tokenizer.chat_template`), built with the
//! `tokenizers` crate and rendered with `minijinja` as llama.cpp's Jinja mode
//! does.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

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

/// One message of a conversation, for [`render_chat_template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_owned(),
            content: content.to_owned(),
        }
    }
}

/// Renders a Hugging Face chat template (Jinja) as llama.cpp's Jinja mode
/// and `transformers` do: `trim_blocks` and `lstrip_blocks` on, Python string
/// methods (`.strip()`, `.split()`…) available, `raise_exception` defined, and
/// the variables `messages`, `add_generation_prompt`, `bos_token` and
/// `eos_token`. The template's own default system prompt, if it has one, is
/// kept: nothing is added or removed here.
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
    let messages: Vec<minijinja::Value> = messages
        .iter()
        .map(|m| minijinja::context! { role => m.role, content => m.content })
        .collect();
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| format!("the chat template failed: {e}"))
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
        if model != "gpt2" {
            return Err(format!(
                "unsupported GGUF tokenizer {model:?}: prompts need \"gpt2\" (byte-level BPE); \
                 infer jobs with token ids do not need one"
            ));
        }
        let tokens = strings(md, "tokenizer.ggml.tokens")?;
        if tokens.len() > vocab_size {
            return Err(format!(
                "tokenizer.ggml.tokens has {} tokens, more than the model's {vocab_size}",
                tokens.len()
            ));
        }
        let merges = strings(md, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| format!("tokenizer.ggml.merges holds {m:?}, not \"a b\""))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
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
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva" => (
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
        // Control (3) and user-defined (4) tokens are matched whole in the
        // text, as llama.cpp does with parse_special; control ones are
        // skipped when decoding.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(text, &t)| AddedToken::from(*text, t == 3))
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
            _ => ignore_merges, // llama.cpp: on for llama3's BPE, off for other BPE
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
}
