//! Live status lines for long steps.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};

/// A spinner with the step's name and elapsed time.
pub fn spinner(message: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("valid template"),
    );
    bar.set_message(message.into());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Runs `command` under a spinner showing its latest output line; on failure prints the
/// last lines of its output.
pub fn run_with_status(step: &str, command: &mut Command) -> anyhow::Result<()> {
    let started = Instant::now();
    let bar = spinner(step);
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let stderr = child.stderr.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        bar.set_message(format!(
            "{step}: {}",
            line.trim().chars().take(70).collect::<String>()
        ));
        tail.push(line);
        if tail.len() > 40 {
            tail.remove(0);
        }
    }
    let mut stdout_lines = out_thread.join().unwrap_or_default();
    let status = child.wait()?;
    bar.finish_and_clear();
    if !status.success() {
        stdout_lines.truncate(40);
        eprintln!("{}\n{}", stdout_lines.join("\n"), tail.join("\n"));
        bail!("{step} failed ({status})");
    }
    println!("✓ {step} ({:.0?})", started.elapsed());
    Ok(())
}
