//! Embed a donor node with your own [`Executor`] on tokio, and call it with the
//! tokio client: `cargo run --example custom_executor`.
//!
//! The executor is plain synchronous Rust: the node calls it on its own worker
//! threads, never on the runtime, so a slow job does not stall any connection.

use donate_tokio::{Executor, JobContext, JobError, NoSpool, ServerConfig, Weights};

/// A "model" that adds its weights' byte sum to every input id.
struct Adder;

impl Executor for Adder {
    type Model = i32;
    type Spool = NoSpool;

    fn mount(&self, _config_json: String, weights: Weights<NoSpool>) -> Result<i32, String> {
        match weights {
            Weights::Memory(bytes) => Ok(bytes.iter().map(|&b| i32::from(b)).sum()),
            Weights::Spooled(spool) => match spool {},
        }
    }

    fn infer(
        &self,
        model: &i32,
        input_ids: &[i32],
        _max_tokens: i64,
        _job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        Ok(input_ids.iter().map(|id| id + model).collect())
    }

    fn prompt(
        &self,
        _prompt: &str,
        _max_out: i64,
        _job: &JobContext<'_>,
    ) -> Result<String, JobError> {
        Err(JobError::new(
            "unsupported",
            "this node runs pushed models only",
        ))
    }
}

// `pub` so that tests/examples.rs can run this example as a test.
#[tokio::main]
pub async fn main() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = donate_tokio::serve(listener, ServerConfig::default(), Adder).unwrap();

    let mut client = donate_tokio::Client::connect(server.local_addr())
        .await
        .unwrap();
    client.push_model("{}", &[1, 2, 3], false).await.unwrap();
    let result = client.infer(&[10, 20], 0).await.unwrap();
    println!("output_ids: {:?}", result.output_ids);
    assert_eq!(result.output_ids, [16, 26]);

    drop(client);
    server.shutdown().await;
}
