//! [`SamplingParams`]: the `sampling` extension's fields on `infer` and
//! `prompt` (docs/PROTOCOL.md §10.7).

use serde::Serialize;

/// How a job asks its tokens to be picked: the optional fields of the
/// `sampling` extension. Every field absent (the [`Default`]) means the
/// node's own default, which is greedy unless its operator set one, so a job
/// without them is answered as before the extension existed.
///
/// A client sends them only to a node that offered `sampling`; a node reads
/// them only from a connection that agreed it (a v1 client's stray fields
/// are ignored).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 is greedy (argmax).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the smallest set of tokens whose probabilities reach it (0 < p <= 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens (k >= 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Repetition penalty (llama.cpp's): above 1 makes tokens already seen less likely.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f64>,
    /// Seed of the sampler: the same seed, model, input and fields give the same tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `prompt` only: the reply ends before the first of these strings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

impl SamplingParams {
    /// Whether no field is set (the job takes the node's default).
    pub fn is_empty(&self) -> bool {
        self.temperature.is_none()
            && self.top_p.is_none()
            && self.top_k.is_none()
            && self.repeat_penalty.is_none()
            && self.seed.is_none()
            && self.stop.is_empty()
    }

    /// The fields set here, over those of `base` (a node's defaults).
    #[must_use]
    pub fn over(&self, base: &SamplingParams) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.or(base.temperature),
            top_p: self.top_p.or(base.top_p),
            top_k: self.top_k.or(base.top_k),
            repeat_penalty: self.repeat_penalty.or(base.repeat_penalty),
            seed: self.seed.or(base.seed),
            stop: if self.stop.is_empty() {
                base.stop.clone()
            } else {
                self.stop.clone()
            },
        }
    }
}

// Numbers compare by their bits, so that equality is an equivalence (a NaN
// equals itself) and messages holding these fields can be `Eq`.
impl PartialEq for SamplingParams {
    fn eq(&self, other: &Self) -> bool {
        let bits = |x: Option<f64>| x.map(f64::to_bits);
        bits(self.temperature) == bits(other.temperature)
            && bits(self.top_p) == bits(other.top_p)
            && self.top_k == other.top_k
            && bits(self.repeat_penalty) == bits(other.repeat_penalty)
            && self.seed == other.seed
            && self.stop == other.stop
    }
}

impl Eq for SamplingParams {}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::message::{Infer, Message, Prompt};

    #[test]
    fn fields_go_after_the_v1_ones_and_only_when_set() {
        let mut infer = Infer {
            job_id: "j1".into(),
            input_ids: vec![1, 2],
            max_tokens: 8,
            deadline_ms: 0,
            sampling: SamplingParams::default(),
        };
        let v1 = r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[1,2],"max_tokens":8}"#;
        assert_eq!(Message::Infer(infer.clone()).to_json(), v1.as_bytes());
        infer.sampling = SamplingParams {
            temperature: Some(0.8),
            seed: Some(u64::MAX),
            ..SamplingParams::default()
        };
        let json = Message::Infer(infer.clone()).to_json();
        assert_eq!(
            String::from_utf8_lossy(&json),
            r#"{"v":1,"type":"infer","job_id":"j1","input_ids":[1,2],"max_tokens":8,"temperature":0.8,"seed":18446744073709551615}"#
        );
        assert_eq!(Message::parse(&json).unwrap(), Message::Infer(infer));
        let prompt = Prompt {
            job_id: "p1".into(),
            prompt: "Hi".into(),
            max_out: 0,
            deadline_ms: 0,
            sampling: SamplingParams {
                top_p: Some(0.9),
                top_k: Some(40),
                repeat_penalty: Some(1.1),
                stop: vec!["\n\n".into()],
                ..SamplingParams::default()
            },
            ..Prompt::default()
        };
        let json = Message::Prompt(prompt.clone()).to_json();
        assert_eq!(
            String::from_utf8_lossy(&json),
            r#"{"v":1,"type":"prompt","job_id":"p1","prompt":"Hi","top_p":0.9,"top_k":40,"repeat_penalty":1.1,"stop":["\n\n"]}"#
        );
        assert_eq!(Message::parse(&json).unwrap(), Message::Prompt(prompt));
        // A field of the wrong type is a bad body, not a silent default.
        for bad in [
            r#"{"v":1,"type":"infer","job_id":"j","top_k":-1}"#,
            r#"{"v":1,"type":"infer","job_id":"j","seed":"7"}"#,
            r#"{"v":1,"type":"prompt","job_id":"p","stop":"x"}"#,
        ] {
            assert!(Message::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_jobs_fields_override_the_nodes_one_by_one() {
        let node = SamplingParams {
            temperature: Some(0.7),
            seed: Some(1),
            stop: vec!["\n".into()],
            ..SamplingParams::default()
        };
        let job = SamplingParams {
            seed: Some(9),
            top_k: Some(5),
            ..SamplingParams::default()
        };
        let merged = job.over(&node);
        assert_eq!(merged.temperature, Some(0.7));
        assert_eq!((merged.seed, merged.top_k), (Some(9), Some(5)));
        assert_eq!(merged.stop, ["\n"]);
        assert!(SamplingParams::default().is_empty());
        assert!(!merged.is_empty());
    }
}
