//! The `lm:` executor runs a real program per prompt: the prompt on stdin
//! reaches it unchanged, placeholders are filled inside argv elements only,
//! and failures, time and output are bounded.
#![cfg(unix)]

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use donate_exec::{split_command, LmConfig, LocalLmCommand};
use donate_proto::{Executor, JobContext, Mode, ServerConfig, Weights};

fn lm(command: &str, config: LmConfig) -> LocalLmCommand {
    LocalLmCommand::new(split_command(command).unwrap(), config).unwrap()
}

/// Prompts no shell or argv could carry unchanged.
fn nasty_prompts() -> Vec<String> {
    let controls: String = (1u8..32).chain([127]).map(char::from).collect();
    vec![
        String::new(),
        "plain".into(),
        r#"quotes ' " '' "" \' \" \\"#.into(),
        "$(touch /tmp/donate-pwned) `touch /tmp/donate-pwned` ${HOME} $HOME; rm -rf / && | > <"
            .into(),
        "line one\nline two\r\nthree\n\n".into(),
        controls,
        "é ü ß 日本語 Ελληνικά العربية 🦀 \u{200b}\u{feff} \u{10ffff}".into(),
        "-n --help {path} {max_out} %s %n \\x00".into(),
        "x".repeat(3 * 1024 * 1024 / 4) + &"🦀".repeat(1024 * 1024 / 4),
    ]
}

#[test]
fn cat_returns_every_prompt_unchanged() {
    let cat = lm(
        "cat",
        LmConfig {
            max_output: 8 * 1024 * 1024,
            ..LmConfig::default()
        },
    );
    for prompt in nasty_prompts() {
        let reply = cat.prompt(&prompt, 0, &JobContext::new("j1")).unwrap();
        assert!(
            reply == prompt,
            "changed: {:?}",
            &prompt[..prompt.len().min(80)]
        );
    }
    assert!(!std::path::Path::new("/tmp/donate-pwned").exists());
}

#[test]
fn cat_over_sockets() {
    let config = ServerConfig::default()
        .mode(Mode::LocalLm)
        .local_lm_path("/models/m".into());
    let executor = lm(
        "cat",
        LmConfig {
            max_output: 8 * 1024 * 1024,
            ..LmConfig::default()
        },
    );
    let server =
        donate_std::serve(TcpListener::bind("127.0.0.1:0").unwrap(), config, executor).unwrap();
    let mut client = donate_std::Client::connect(server.local_addr()).unwrap();
    for prompt in nasty_prompts() {
        let result = client.prompt(&prompt, 0).unwrap();
        assert!(
            result.text == prompt,
            "changed: {:?}",
            &prompt[..prompt.len().min(80)]
        );
    }
    drop(client);
    server.shutdown();
}

#[test]
fn placeholders_fill_argv_elements_only() {
    let config = LmConfig {
        local_lm_path: "/models/my model; $(id)".into(),
        default_max_out: 99,
        ..LmConfig::default()
    };
    let echo = lm(
        r#"sh -c 'printf "%s|%s|%s" "$1" "$2" "$3"' sh {path} -n{max_out} {max_out}{path}"#,
        config,
    );
    assert_eq!(
        echo.prompt("ignored", 7, &JobContext::new("j1")).unwrap(),
        "/models/my model; $(id)|-n7|7/models/my model; $(id)"
    );
    assert_eq!(
        echo.prompt("ignored", 0, &JobContext::new("j1"))
            .unwrap()
            .split('|')
            .nth(1),
        Some("-n99")
    );
}

#[test]
fn a_failing_program_reports_its_stderr_tail() {
    let noisy = lm(
        r#"sh -c 'i=0; while [ $i -lt 500 ]; do echo "noise line $i" >&2; i=$((i+1)); done; echo "the real reason" >&2; exit 3'"#,
        LmConfig::default(),
    );
    let error = noisy.prompt("hi", 0, &JobContext::new("j1")).unwrap_err();
    assert_eq!(error.code, "lm_failed");
    assert!(
        error.message.contains("exit status: 3"),
        "{}",
        error.message
    );
    assert!(
        error.message.ends_with("the real reason"),
        "{}",
        error.message
    );
    assert!(!error.message.contains("noise line 0\n"), "only the tail");
    assert!(error.message.len() < 2048 + 200, "{}", error.message.len());

    let silent = lm("false", LmConfig::default())
        .prompt("hi", 0, &JobContext::new("j1"))
        .unwrap_err();
    assert_eq!(silent.code, "lm_failed");
    assert!(silent.message.contains("(no stderr)"), "{}", silent.message);
}

#[test]
fn output_over_the_limit_fails() {
    let config = LmConfig {
        max_output: 1000,
        ..LmConfig::default()
    };
    let exact = lm("head -c 1000 /dev/zero", config.clone());
    assert_eq!(
        exact.prompt("", 0, &JobContext::new("j1")).unwrap().len(),
        1000
    );
    let over = lm("head -c 1001 /dev/zero", config.clone());
    assert_eq!(
        over.prompt("", 0, &JobContext::new("j1")).unwrap_err().code,
        "lm_output_too_large"
    );
    // A program that never stops printing is stopped.
    let started = Instant::now();
    let endless = lm("yes", config);
    assert_eq!(
        endless
            .prompt("", 0, &JobContext::new("j1"))
            .unwrap_err()
            .code,
        "lm_output_too_large"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_slow_program_is_killed_at_the_time_limit() {
    let config = LmConfig {
        timeout: Duration::from_millis(300),
        ..LmConfig::default()
    };
    for command in ["sleep 30", "sh -c 'sleep 30; echo late'"] {
        let started = Instant::now();
        let error = lm(command, config.clone())
            .prompt("hi", 0, &JobContext::new("j1"))
            .unwrap_err();
        assert_eq!(error.code, "lm_timeout", "{command}: {error:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{command}");
    }
}

#[test]
fn writing_a_lot_before_reading_does_not_deadlock() {
    let config = LmConfig {
        max_output: 4 * 1024 * 1024,
        ..LmConfig::default()
    };
    let chatty = lm(
        r#"sh -c 'head -c 1000000 /dev/zero | tr "\0" x; cat >/dev/null; echo done >&2'"#,
        config,
    );
    let prompt = "p".repeat(2 * 1024 * 1024);
    let reply = chatty.prompt(&prompt, 0, &JobContext::new("j1")).unwrap();
    assert_eq!(reply.len(), 1_000_000);
    assert!(reply.bytes().all(|b| b == b'x'));
}

#[test]
fn a_program_that_ignores_stdin_is_fine() {
    let echo = lm("echo ok", LmConfig::default());
    assert_eq!(
        echo.prompt(&"ignored ".repeat(100_000), 0, &JobContext::new("j1"))
            .unwrap(),
        "ok\n"
    );
}

#[test]
fn invalid_utf8_output_is_replaced() {
    let bad = lm(r#"printf '\377ok\300'"#, LmConfig::default());
    assert_eq!(
        bad.prompt("", 0, &JobContext::new("j1")).unwrap(),
        "\u{fffd}ok\u{fffd}"
    );
}

#[test]
fn a_missing_program_is_lm_spawn_failed() {
    let error = lm("/nonexistent/llm -m {path}", LmConfig::default())
        .prompt("hi", 0, &JobContext::new("j1"))
        .unwrap_err();
    assert_eq!(error.code, "lm_spawn_failed");
    assert!(
        error.message.contains("/nonexistent/llm"),
        "{}",
        error.message
    );
}

#[test]
fn models_and_infer_are_refused() {
    let cat = lm("cat", LmConfig::default());
    assert!(cat.mount("{}".into(), Weights::Memory(vec![1])).is_err());
    assert_eq!(
        cat.infer(&(), &[1], 1, &JobContext::new("j1"))
            .unwrap_err()
            .code,
        "unsupported"
    );
}
