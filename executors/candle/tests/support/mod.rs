//! Random llamas made on the spot (seeded), written as config.json +
//! model.safetensors, and a reference greedy generation run with candle
//! directly. Shared by the tests and the bench (`#[path]`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};

/// The sizes of a random llama.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub max_pos: usize,
}

/// 2 layers, hidden 64, 4 heads over 2 key/value heads, vocabulary 256.
pub const TINY: Dims = Dims {
    hidden: 64,
    intermediate: 128,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    vocab: 256,
    max_pos: 512,
};

/// About 100M parameters: hidden 768, 12 layers, intermediate 2048, vocabulary 32000.
pub const SMALL: Dims = Dims {
    hidden: 768,
    intermediate: 2048,
    layers: 12,
    heads: 12,
    kv_heads: 12,
    vocab: 32000,
    max_pos: 2048,
};

impl Dims {
    /// A Hugging Face style config.json.
    pub fn config_json(&self) -> String {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_pos,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "torch_dtype": "float32"
        })
        .to_string()
    }

    /// Parameters of the model.
    pub fn params(&self) -> usize {
        let head = self.hidden / self.heads;
        let per_layer = self.hidden * self.hidden * 2
            + 2 * self.hidden * head * self.kv_heads
            + 3 * self.hidden * self.intermediate
            + 2 * self.hidden;
        2 * self.vocab * self.hidden + self.hidden + self.layers * per_layer
    }

    /// Every weight, random from `seed`: uniform in ±1/sqrt(fan_in) for the
    /// matrices (±1 for the embeddings), 1 ± 0.1 for the norms.
    pub fn random_tensors(&self, seed: u64) -> HashMap<String, Tensor> {
        let mut rng = SplitMix(seed);
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let kv = h / self.heads * self.kv_heads;
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![v, h]),
            ("model.norm.weight".into(), vec![h]),
            ("lm_head.weight".into(), vec![v, h]),
        ];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            shapes.extend([
                (format!("{p}.self_attn.q_proj.weight"), vec![h, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, h]),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            ]);
        }
        shapes
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = if shape.len() == 1 {
                    (0..n).map(|_| 1.0 + 0.1 * rng.unit()).collect()
                } else if name.contains("embed_tokens") {
                    (0..n).map(|_| rng.unit()).collect()
                } else {
                    let scale = 1.0 / (shape[1] as f32).sqrt();
                    (0..n).map(|_| scale * rng.unit()).collect()
                };
                let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
                (name, t)
            })
            .collect()
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` from `tensors`.
    pub fn write(&self, dir: &Path, tensors: &HashMap<String, Tensor>) {
        std::fs::write(dir.join("config.json"), self.config_json()).unwrap();
        candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
    }
}

/// safetensors bytes of `tensors`.
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    candle_core::safetensors::save(tensors, &path).unwrap();
    std::fs::read(path).unwrap()
}

/// A llama built from `tensors` by candle directly, for reference runs.
pub struct Direct {
    llama: Llama,
    config: candle_transformers::models::llama::Config,
}

impl Direct {
    pub fn new(config_json: &str, tensors: &HashMap<String, Tensor>) -> Direct {
        let config: LlamaConfig = serde_json::from_str(config_json).unwrap();
        let config = config.into_config(false);
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        Direct {
            llama: Llama::load(vb, &config).unwrap(),
            config,
        }
    }

    /// Greedy generation of `n` tokens after `input` with a KV cache (the
    /// prompt in one pass, then one token at a time): the new ids only.
    pub fn generate(&self, input: &[u32], n: usize) -> Vec<u32> {
        let mut cache = Cache::new(true, DType::F32, &self.config, &Device::Cpu).unwrap();
        let mut tokens = input.to_vec();
        let mut pos = 0;
        for _ in 0..n {
            let ctx = &tokens[pos..];
            let x = Tensor::new(ctx, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = self.llama.forward(&x, pos, &mut cache).unwrap();
            pos = tokens.len();
            let next = logits
                .squeeze(0)
                .unwrap()
                .argmax(D::Minus1)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            tokens.push(next);
        }
        tokens.split_off(input.len())
    }
}

/// splitmix64: a small seeded generator, enough for random weights.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}
