//! `cargo xtask bench all`: every benchmark, one after the other under a live display, each
//! writing its JSON (and its printed table) into `bench-results/`; then one Markdown report,
//! `bench-results/REPORT.md`, with SVG plots (drawn by `chart`, with plotters), the
//! machine it ran on and the exact commands.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::{
    chart::{BLUE, Bars, GREEN, GREY, Line, ORANGE, bar_chart, line_chart},
    setup,
    status::run_with_status,
};

/// Where the results go, relative to the workspace root (git-ignored).
const OUT_DIR: &str = "bench-results";

/// One benchmark: how to run it and what it is called.
struct Step {
    name: &'static str,
    title: &'static str,
    /// `cargo bench` arguments before `--`.
    cargo: Vec<&'static str>,
    /// The benchmark's own arguments (after `--`), `--json FILE` added.
    args: Vec<String>,
}

impl Step {
    fn command_line(&self, json: &str) -> String {
        format!(
            "cargo bench {} -- {} --json {json}",
            self.cargo.join(" "),
            self.args.join(" ")
        )
        .replace("  ", " ")
    }
}

struct Outcome {
    name: &'static str,
    command: String,
    seconds: f64,
    ok: bool,
}

fn steps(quick: bool) -> Vec<Step> {
    let lb = |bench: &'static str| vec!["-p", crate::bench::PACKAGE, "--bench", bench];
    let q = |full: &[&str], short: &[&str]| -> Vec<String> {
        (if quick { short } else { full })
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let mut steps = vec![
        Step {
            name: "maglev",
            title: "MaglevTable build, balance, disruption",
            cargo: lb("maglev"),
            args: q(&[], &["--quick"]),
        },
        Step {
            name: "memory",
            title: "map memory",
            cargo: lb("memory"),
            args: Vec::new(),
        },
        Step {
            name: "xdp",
            title: "per-packet cost (BPF_PROG_TEST_RUN)",
            cargo: lb("xdp"),
            args: q(&["--calls", "200000"], &["--calls", "50000"]),
        },
        Step {
            name: "scaling",
            title: "per-packet cost vs Vips, backends, flows",
            cargo: lb("scaling"),
            args: q(&[], &["--quick"]),
        },
        Step {
            name: "throughput",
            title: "forwarding throughput: XDP vs nftables vs routing",
            cargo: lb("throughput"),
            args: q(&[], &["--seconds", "1", "--rounds", "1"]),
        },
    ];
    steps.push(Step {
        name: "failover",
        title: "failover on the real daemon",
        cargo: lb("failover"),
        args: q(&[], &["--rounds", "2"]),
    });
    steps
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!("the benchmarks load XDP programs and create network namespaces: run them as root");
    }
    let root = setup::workspace_root();
    let out = root.join(OUT_DIR);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    let load_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();

    crate::bench::build_mlb(false)?;
    run_with_status(
        "building the benchmarks",
        Command::new("cargo").current_dir(&root).args([
            "bench",
            "--no-run",
            "-p",
            crate::bench::PACKAGE,
        ]),
    )?;

    let steps = steps(quick);
    let multi = MultiProgress::new();
    let overall = multi.add(ProgressBar::new(steps.len() as u64));
    overall.set_style(
        ProgressStyle::with_template("{bar:24.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}]")
            .expect("valid template")
            .progress_chars("█▉ "),
    );
    overall.enable_steady_tick(Duration::from_millis(200));
    let line = multi.add(ProgressBar::new_spinner());
    line.set_style(ProgressStyle::with_template("  {spinner} {msg}").expect("valid template"));
    line.enable_steady_tick(Duration::from_millis(120));

    let mut outcomes = Vec::new();
    for step in &steps {
        overall.set_message(format!("{}: {}", step.name, step.title));
        let json = out.join(format!("{}.json", step.name));
        let _ = fs::remove_file(&json);
        let json_rel = format!("{OUT_DIR}/{}.json", step.name);
        let t = Instant::now();
        let result = run_step(&root, step, &json, &out, &line);
        let seconds = t.elapsed().as_secs_f64();
        let ok = result.is_ok() && json.exists();
        let note = match &result {
            Ok(()) if ok => headline(step.name, &json).unwrap_or_default(),
            Ok(()) => "wrote no JSON".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        let done = format!(
            "{} {:<10} {:>5.0} s  {note}",
            if ok { "✓" } else { "✗" },
            step.name,
            seconds
        );
        if overall.is_hidden() {
            println!("{done}");
        } else {
            overall.println(done);
        }
        outcomes.push(Outcome {
            name: step.name,
            command: step.command_line(&json_rel),
            seconds,
            ok,
        });
        overall.inc(1);
    }
    line.finish_and_clear();
    overall.finish_and_clear();

    let load_after = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let report = Report {
        out: &out,
        outcomes: &outcomes,
        quick,
        seconds: started.elapsed().as_secs_f64(),
        load: (load_before, load_after),
    };
    let path = report.write()?;
    println!("report: {}", path.display());
    let failed: Vec<&str> = outcomes.iter().filter(|o| !o.ok).map(|o| o.name).collect();
    if !failed.is_empty() {
        bail!(
            "{} failed (their output is in {OUT_DIR}/NAME.txt)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// Runs one benchmark: stdout into `NAME.txt`, the latest line of either stream on `line`.
fn run_step(
    root: &Path,
    step: &Step,
    json: &Path,
    out: &Path,
    line: &ProgressBar,
) -> anyhow::Result<()> {
    let mut command = Command::new("cargo");
    command
        .current_dir(root)
        .arg("bench")
        .arg("-q")
        .args(&step.cargo)
        .arg("--")
        .args(&step.args)
        .arg("--json")
        .arg(json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let name = step.name;
    let line_out = line.clone();
    let collector = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !l.trim().is_empty() {
                line_out.set_message(format!("{name}: {}", clip(&l)));
            }
            lines.push(l);
        }
        lines
    });
    // Progress lines end in \r as often as in \n.
    let mut tail = Vec::new();
    let mut current = Vec::new();
    let mut bytes = BufReader::new(stderr).bytes();
    while let Some(Ok(b)) = bytes.next() {
        if b == b'\r' || b == b'\n' {
            let text = String::from_utf8_lossy(&current).trim().to_owned();
            if !text.is_empty() {
                line.set_message(format!("{name}: {}", clip(&text)));
                if b == b'\n' {
                    tail.push(text);
                    if tail.len() > 30 {
                        tail.remove(0);
                    }
                }
            }
            current.clear();
        } else {
            current.push(b);
        }
    }
    let stdout_lines = collector.join().unwrap_or_default();
    let status = child.wait()?;
    let mut text = stdout_lines.join("\n");
    text.push('\n');
    if !status.success() {
        text.push_str("\n--- stderr (last lines) ---\n");
        text.push_str(&tail.join("\n"));
        text.push('\n');
    }
    fs::write(out.join(format!("{name}.txt")), text)?;
    if !status.success() {
        bail!(
            "{status}: {}",
            tail.last().map(String::as_str).unwrap_or("no output")
        );
    }
    Ok(())
}

fn clip(s: &str) -> String {
    s.trim().chars().take(90).collect()
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&fs::read_to_string(path).ok()?).ok()
}

/// A one-line summary of a benchmark's JSON, for the live display.
fn headline(name: &str, path: &Path) -> Option<String> {
    let v = read_json(path)?;
    Some(match name {
        "xdp" => v["paths"]
            .as_array()?
            .iter()
            .skip(1)
            .map(|p| {
                format!(
                    "{}: {:.0} ns",
                    short_path(p["path"].as_str().unwrap_or("")),
                    p["ns_above_empty"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        "throughput" => v["ratios"]
            .as_array()?
            .iter()
            .map(|r| {
                format!(
                    "{}: XDP/nft {:.1}× per core",
                    r["proto"].as_str().unwrap_or(""),
                    r["xdp_over_nft_per_core"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        "scaling" => v["series"]
            .as_array()?
            .iter()
            .map(|s| {
                format!(
                    "{}: {}",
                    s["name"].as_str().unwrap_or(""),
                    s["growth"]["model"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        "maglev" => {
            let b = v["builds"]
                .as_array()?
                .iter()
                .find(|b| b["n"] == 1000 && b["m"] == 65537)?;
            format!(
                "N=1000 M=65537: {:.3} ms",
                b["median_ms"].as_f64().unwrap_or(f64::NAN)
            )
        }
        "memory" => v["rows"]
            .as_array()?
            .iter()
            .map(|r| {
                format!(
                    "{} Vips {:.0} MiB",
                    r["vips"],
                    r["total_mib"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        "failover" => format!(
            "detection to live table: median {:.0} µs",
            v["detect_to_live_us"]["median"]
                .as_f64()
                .unwrap_or(f64::NAN)
        ),
        _ => String::new(),
    })
}

fn short_path(p: &str) -> String {
    p.replace("established ", "est. ")
        .replace(" (SYN, conntrack insert)", "")
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

struct Report<'a> {
    out: &'a Path,
    outcomes: &'a [Outcome],
    quick: bool,
    seconds: f64,
    load: (String, String),
}

impl Report<'_> {
    fn json(&self, name: &str) -> Option<Value> {
        read_json(&self.out.join(format!("{name}.json")))
    }

    fn svg(&self, name: &str, svg: String) -> anyhow::Result<String> {
        let file = format!("{name}.svg");
        fs::write(self.out.join(&file), svg)?;
        Ok(format!("![{name}]({file})\n\n"))
    }

    fn write(&self) -> anyhow::Result<PathBuf> {
        let mut md = String::new();
        self.header(&mut md);
        self.summary(&mut md);
        self.xdp(&mut md)?;
        self.throughput(&mut md)?;
        self.scaling(&mut md)?;
        self.maglev(&mut md)?;
        self.memory(&mut md);
        self.failover(&mut md);
        let path = self.out.join("REPORT.md");
        fs::write(&path, md)?;
        Ok(path)
    }

    fn header(&self, md: &mut String) {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("?".to_owned(), |(_, m)| m.trim().to_owned());
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let memory = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or("?".to_owned(), |kb| {
                format!("{:.1} GiB", kb / 1024.0 / 1024.0)
            });
        let virt = command_output("systemd-detect-virt", &[]);
        let commit = command_output("git", &["rev-parse", "--short=12", "HEAD"]);
        let status = command_output("git", &["status", "--porcelain", "--untracked-files=no"]);
        let commit = match (commit.as_str(), status.as_str()) {
            ("?", _) => "unknown (not a git checkout)".to_owned(),
            (c, "") => c.to_owned(),
            (c, _) => format!("{c} (with uncommitted changes)"),
        };
        let rustc = command_output("rustc", &["--version"]);
        let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
        let _ = writeln!(md, "# mlb performance report\n");
        let _ = writeln!(
            md,
            "Generated by `cargo xtask bench all{}` on {date}, {:.0} s in all. Each benchmark's \
             JSON and printed table are next to this file (`NAME.json`, `NAME.txt`).\n",
            if self.quick { " --quick" } else { "" },
            self.seconds
        );
        let _ = writeln!(md, "| machine | |\n|---|---|");
        let _ = writeln!(
            md,
            "| CPU | {model}, {cpus} CPUs{} |",
            match virt.as_str() {
                "?" | "none" => String::new(),
                v => format!(" (virtualised: {v})"),
            }
        );
        let _ = writeln!(md, "| memory | {memory} |");
        let _ = writeln!(md, "| kernel | {} |", kernel.trim());
        let _ = writeln!(md, "| rustc | {rustc} |");
        let _ = writeln!(md, "| commit | {commit} |");
        let _ = writeln!(
            md,
            "| load average before / after | {} / {} |",
            self.load
                .0
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            self.load
                .1
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        if self.quick {
            let _ = writeln!(
                md,
                "\n**--quick**: fewer calls, shorter runs; for a look, not for the record."
            );
        }
        let _ = writeln!(md, "\n## Commands\n\n```sh");
        let _ = writeln!(
            md,
            "cargo xtask bench all{}   # runs, in order:",
            if self.quick { " --quick" } else { "" }
        );
        for o in self.outcomes {
            let _ = writeln!(md, "{}", o.command);
        }
        let _ = writeln!(md, "```\n");
        let _ = writeln!(md, "| benchmark | time | result |\n|---|---:|---|");
        for o in self.outcomes {
            let _ = writeln!(
                md,
                "| {} | {:.0} s | {} |",
                o.name,
                o.seconds,
                if o.ok {
                    "ok".to_owned()
                } else {
                    format!("**failed**: see `{}.txt`", o.name)
                }
            );
        }
        md.push('\n');
    }

    fn summary(&self, md: &mut String) {
        let mut rows: Vec<(String, String, String, Option<bool>)> = Vec::new();
        if let Some(v) = self.json("xdp") {
            for p in v["paths"].as_array().into_iter().flatten().skip(1) {
                let Some(target) = p["target_ns"].as_f64() else {
                    continue;
                };
                let got = p["ns_above_empty"].as_f64().unwrap_or(f64::NAN);
                rows.push((
                    format!("{} (ns above empty)", p["path"].as_str().unwrap_or("")),
                    format!("≤ {target:.0}"),
                    format!("{got:.1}"),
                    Some(got <= target),
                ));
            }
        }
        if let Some(v) = self.json("throughput") {
            for r in v["ratios"].as_array().into_iter().flatten() {
                let got = r["xdp_over_nft_per_core"].as_f64().unwrap_or(f64::NAN);
                let target = r["target_xdp_over_nft_per_core"].as_f64().unwrap_or(3.0);
                rows.push((
                    format!(
                        "{} packets per core, XDP / nftables",
                        r["proto"].as_str().unwrap_or("").to_uppercase()
                    ),
                    format!("≥ {target:.0}×"),
                    format!("{got:.2}×"),
                    Some(got >= target),
                ));
            }
        }
        if let Some(v) = self.json("maglev") {
            for (m, key) in [(65537, "m65537"), (655373, "m655373")] {
                let target = v["build_targets_ms"][key].as_f64();
                let got = v["builds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|b| b["n"] == 1000 && b["m"] == m)
                    .and_then(|b| b["median_ms"].as_f64());
                if let (Some(target), Some(got)) = (target, got) {
                    rows.push((
                        format!("MaglevTable build, N = 1000, M = {m} (ms)"),
                        format!("≤ {target}"),
                        format!("{got:.3}"),
                        Some(got <= target),
                    ));
                }
            }
            for r in v["disruption"]["rows"].as_array().into_iter().flatten() {
                let Some(target) = r["target_mean_extra_pct"].as_f64() else {
                    continue;
                };
                let got = r["mean_extra_pct"].as_f64().unwrap_or(f64::NAN);
                rows.push((
                    format!(
                        "flows moved beyond the necessary, {} of 1000 (% of M, mean)",
                        r["change"].as_str().unwrap_or("")
                    ),
                    format!("≤ {target}"),
                    format!("{got:.3}"),
                    Some(got <= target),
                ));
            }
        }
        if let Some(v) = self.json("failover") {
            let live = &v["detect_to_live_us"];
            if let (Some(got), Some(target)) = (live["median"].as_f64(), live["target"].as_f64()) {
                rows.push((
                    "failover: detection to live table, median (µs)".to_owned(),
                    format!("≤ {target:.0}"),
                    format!("{got:.0}"),
                    Some(got <= target),
                ));
            }
        }
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "## Targets\n\n| figure | target | measured | |\n|---|---:|---:|---|"
        );
        for (what, target, got, met) in rows {
            let _ = writeln!(
                md,
                "| {what} | {target} | {got} | {} |",
                match met {
                    Some(true) => "met",
                    Some(false) => "**not met**",
                    None => "",
                }
            );
        }
        md.push('\n');
    }

    fn xdp(&self, md: &mut String) -> anyhow::Result<()> {
        let Some(v) = self.json("xdp") else {
            return Ok(());
        };
        let _ = writeln!(md, "## Per-packet cost by path\n");
        let _ = writeln!(
            md,
            "`BPF_PROG_TEST_RUN`, one packet per call, {} calls per path in {} interleaved \
             rounds, minus the empty XDP program measured the same way in the same round \
             (DESIGN.md's method); the figure is the median over rounds, ± half the \
             interquartile range. Kernel {}, {} CPUs, pinned to one.\n",
            v["calls"],
            v["rounds"],
            v["kernel"].as_str().unwrap_or("?"),
            v["cpus"]
        );
        let paths: Vec<&Value> = v["paths"].as_array().into_iter().flatten().collect();
        let measured: Vec<&Value> = paths.iter().skip(1).copied().collect();
        let chart = bar_chart(
            "ns per packet above the empty XDP program (lower is better; | = target)",
            &measured
                .iter()
                .map(|p| p["path"].as_str().unwrap_or("").to_owned())
                .collect::<Vec<_>>(),
            &[Bars {
                name: "ns above empty",
                values: measured
                    .iter()
                    .map(|p| p["ns_above_empty"].as_f64().unwrap_or(0.0))
                    .collect(),
                color: BLUE,
            }],
            &measured
                .iter()
                .map(|p| p["target_ns"].as_f64())
                .collect::<Vec<_>>(),
            "ns",
        );
        md.push_str(&self.svg("xdp", chart)?);
        let _ = writeln!(
            md,
            "| path | ns/call | ns above empty | ± IQR/2 | target |\n|---|---:|---:|---:|---:|"
        );
        for p in paths {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.1} | {:.1} | {} |",
                p["path"].as_str().unwrap_or(""),
                p["ns_per_call"].as_f64().unwrap_or(f64::NAN),
                p["ns_above_empty"].as_f64().unwrap_or(f64::NAN),
                p["round_iqr_ns"].as_f64().unwrap_or(f64::NAN) / 2.0,
                p["target_ns"]
                    .as_f64()
                    .map_or("–".to_owned(), |t| format!("≤ {t:.0}"))
            );
        }
        md.push('\n');
        Ok(())
    }

    fn throughput(&self, md: &mut String) -> anyhow::Result<()> {
        let Some(v) = self.json("throughput") else {
            return Ok(());
        };
        let _ = writeln!(
            md,
            "## Forwarding throughput: XDP vs nftables vs plain routing\n"
        );
        let _ = writeln!(
            md,
            "In the same run, on veth in network namespaces: {}. {}-byte frames, {} flows, {} \
             round(s) of {} s per method. The load balancer's work is its veth's NAPI thread, \
             alone on CPU {}; the generator and the reflector share CPU {}. A method whose thread \
             was busy less than {:.0}% of the time was not saturated (its per-core figure is \
             then a lower bound). veth is a software NIC: absolute rates are far below a \
             physical NIC's; the ratios are the result.\n",
            v["method"].as_str().unwrap_or(""),
            v["frame_bytes"],
            v["flows"],
            v["rounds"],
            v["seconds_per_run"],
            v["lb_cpu"],
            v["generator_cpu"],
            v["saturated_above"].as_f64().unwrap_or(0.9) * 100.0
        );
        let rows: Vec<&Value> = v["summary"].as_array().into_iter().flatten().collect();
        let labels: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{} {}",
                    r["describe"].as_str().unwrap_or(""),
                    r["proto"].as_str().unwrap_or("").to_uppercase()
                )
            })
            .collect();
        let field =
            |k: &str| -> Vec<f64> { rows.iter().map(|r| r[k].as_f64().unwrap_or(0.0)).collect() };
        let chart = bar_chart(
            "Mpps: forwarded in the run, and per core of the load balancer (higher is better)",
            &labels,
            &[
                Bars {
                    name: "forwarded Mpps",
                    values: field("mpps"),
                    color: GREY,
                },
                Bars {
                    name: "Mpps per core",
                    values: field("mpps_per_core"),
                    color: BLUE,
                },
            ],
            &vec![None; rows.len()],
            "Mpps",
        );
        md.push_str(&self.svg("throughput", chart)?);
        let _ = writeln!(
            md,
            "| method | proto | offered Mpps | forwarded Mpps | lb CPU busy | lb ns/packet | Mpps per core |\n|---|---|---:|---:|---:|---:|---:|"
        );
        for r in &rows {
            let _ = writeln!(
                md,
                "| {} | {} | {:.3} | {:.3} | {:.0}%{} | {:.0} | {:.3} |",
                r["describe"].as_str().unwrap_or(""),
                r["proto"].as_str().unwrap_or(""),
                r["sent_mpps"].as_f64().unwrap_or(f64::NAN),
                r["mpps"].as_f64().unwrap_or(f64::NAN),
                r["lb_cpu_util"].as_f64().unwrap_or(f64::NAN) * 100.0,
                if r["lb_saturated"].as_bool() == Some(false) {
                    " (not saturated)"
                } else {
                    ""
                },
                r["lb_ns_per_packet"].as_f64().unwrap_or(f64::NAN),
                r["mpps_per_core"].as_f64().unwrap_or(f64::NAN),
            );
        }
        md.push('\n');
        for r in v["ratios"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "- **{}**: XDP forwards **{:.2}×** nftables' packets per core ({:.2}× its packets \
                 per second) and {:.2}× plain routing's per core ({:.2}× per second); target ≥ \
                 {:.0}× nftables per core: {}.",
                r["proto"].as_str().unwrap_or("").to_uppercase(),
                r["xdp_over_nft_per_core"].as_f64().unwrap_or(f64::NAN),
                r["xdp_over_nft_pps"].as_f64().unwrap_or(f64::NAN),
                r["xdp_over_plain_per_core"].as_f64().unwrap_or(f64::NAN),
                r["xdp_over_plain_pps"].as_f64().unwrap_or(f64::NAN),
                r["target_xdp_over_nft_per_core"].as_f64().unwrap_or(3.0),
                if r["met"].as_bool() == Some(true) {
                    "met"
                } else {
                    "**not met**"
                }
            );
        }
        md.push('\n');
        Ok(())
    }

    fn scaling(&self, md: &mut String) -> anyhow::Result<()> {
        let Some(v) = self.json("scaling") else {
            return Ok(());
        };
        let _ = writeln!(md, "## Per-packet cost as the work grows\n");
        let _ = writeln!(
            md,
            "{}; at least {} calls per point in {} rounds, on one CPU. Growth: flat when the \
             whole range stays within max(5 ns, 15% of the mean, the rounds' spread) or no fit \
             reaches R² 0.5, else the better (by R²) of a least-squares fit against log10(x) \
             and against x.\n",
            v["method"].as_str().unwrap_or(""),
            v["calls"],
            v["rounds"]
        );
        let series: Vec<&Value> = v["series"].as_array().into_iter().flatten().collect();
        let points = |s: &Value| -> Vec<(f64, f64)> {
            s["points"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    (
                        p["x"].as_f64().unwrap_or(0.0),
                        p["ns_above_empty"].as_f64().unwrap_or(0.0),
                    )
                })
                .collect()
        };
        let find = |name: &str| series.iter().find(|s| s["name"] == name).copied();
        let charts: [(&str, &str, Vec<&str>); 3] = [
            ("vips", "number of Vips", vec!["vips", "vips_not_vip"]),
            ("backends", "backends per Vip", vec!["backends"]),
            ("flows", "active flows", vec!["flows"]),
        ];
        for (file, x_label, names) in charts {
            let lines: Vec<Line> = names
                .iter()
                .filter_map(|n| find(n))
                .zip([BLUE, ORANGE])
                .map(|(s, color)| Line {
                    name: s["path"].as_str().unwrap_or("").to_owned(),
                    points: points(s),
                    color,
                })
                .collect();
            if lines.is_empty() {
                continue;
            }
            let _ = writeln!(md, "### Cost vs {x_label}\n");
            md.push_str(&self.svg(
                &format!("scaling-{file}"),
                line_chart(
                    &format!("ns per packet above empty vs {x_label}"),
                    x_label,
                    "ns above empty",
                    &lines,
                    true,
                    false,
                ),
            )?);
            for n in names {
                let Some(s) = find(n) else { continue };
                let _ = writeln!(
                    md,
                    "{}: **{}**\n\n| {x_label} | ns/call | ns above empty | ± rounds | calls | \
                     connection-table misses |\n|---:|---:|---:|---:|---:|---:|",
                    s["path"].as_str().unwrap_or(""),
                    s["growth"]["summary"].as_str().unwrap_or("")
                );
                for p in s["points"].as_array().into_iter().flatten() {
                    let _ = writeln!(
                        md,
                        "| {} | {:.1} | {:.1} | {:.1} | {} | {} |",
                        p["x"],
                        p["ns_per_call"].as_f64().unwrap_or(f64::NAN),
                        p["ns_above_empty"].as_f64().unwrap_or(f64::NAN),
                        p["round_spread_ns"].as_f64().unwrap_or(f64::NAN) / 2.0,
                        p["calls"],
                        p["conntrack_misses"]
                    );
                }
                md.push('\n');
            }
        }
        Ok(())
    }

    fn maglev(&self, md: &mut String) -> anyhow::Result<()> {
        let Some(v) = self.json("maglev") else {
            return Ok(());
        };
        let _ = writeln!(md, "## MaglevTable build time vs N and M\n");
        let builds: Vec<&Value> = v["builds"].as_array().into_iter().flatten().collect();
        let mut sizes: Vec<u64> = builds.iter().filter_map(|b| b["m"].as_u64()).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let lines: Vec<Line> = sizes
            .iter()
            .zip([BLUE, ORANGE, GREEN, GREY])
            .map(|(&m, color)| Line {
                name: format!("M = {m}"),
                points: builds
                    .iter()
                    .filter(|b| b["m"].as_u64() == Some(m))
                    .map(|b| {
                        (
                            b["n"].as_f64().unwrap_or(0.0),
                            b["median_ms"].as_f64().unwrap_or(0.0),
                        )
                    })
                    .collect(),
                color,
            })
            .collect();
        md.push_str(&self.svg(
            "maglev-build",
            line_chart(
                "MaglevTable build time (median ms, single core) vs backends N",
                "backends N",
                "ms",
                &lines,
                true,
                true,
            ),
        )?);
        // The bench fits it (lb_testbed::bench::fit): one least-squares fit, not two.
        for g in v["growth"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "- M = {}: build time grows as about N^{:.2} (log-log fit, R² {:.2}).",
                g["m"],
                g["exponent"].as_f64().unwrap_or(f64::NAN),
                g["r2"].as_f64().unwrap_or(f64::NAN)
            );
        }
        if sizes.len() >= 2 {
            let (m0, m1) = (sizes[0], sizes[sizes.len() - 1]);
            let ratio: Vec<String> = builds
                .iter()
                .filter(|b| b["m"].as_u64() == Some(m0))
                .filter_map(|b| {
                    let n = &b["n"];
                    let other = builds
                        .iter()
                        .find(|o| &o["n"] == n && o["m"].as_u64() == Some(m1))?;
                    Some(format!(
                        "{:.1}× at N = {n}",
                        other["median_ms"].as_f64()? / b["median_ms"].as_f64()?
                    ))
                })
                .collect();
            let _ = writeln!(
                md,
                "- M = {m1} over M = {m0} ({:.1}× the slots): {}.",
                m1 as f64 / m0 as f64,
                ratio.join(", ")
            );
        }
        let _ = writeln!(
            md,
            "\n| N | M | runs | median ms | min ms | max/mean slots |\n|---:|---:|---:|---:|---:|---:|"
        );
        for b in &builds {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.3} | {:.3} | {:.4} |",
                b["n"],
                b["m"],
                b["runs"],
                b["median_ms"].as_f64().unwrap_or(f64::NAN),
                b["min_ms"].as_f64().unwrap_or(f64::NAN),
                b["max_over_mean"].as_f64().unwrap_or(f64::NAN)
            );
        }
        let rows: Vec<&Value> = v["disruption"]["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        if !rows.is_empty() {
            let _ = writeln!(
                md,
                "\n## Disruption vs backends removed\n\nN = {}, M = {}: flows moved beyond those \
                 of the removed backends (or beyond those moving to an added one), % of M, over \
                 trials with a new seed and random choice each.\n",
                v["disruption"]["n"], v["disruption"]["m"]
            );
            let chart = bar_chart(
                "flows moved beyond the necessary, % of M (lower is better; | = target on the mean)",
                &rows
                    .iter()
                    .map(|r| r["change"].as_str().unwrap_or("").to_owned())
                    .collect::<Vec<_>>(),
                &[
                    Bars {
                        name: "mean",
                        values: rows
                            .iter()
                            .map(|r| r["mean_extra_pct"].as_f64().unwrap_or(0.0))
                            .collect(),
                        color: BLUE,
                    },
                    Bars {
                        name: "max",
                        values: rows
                            .iter()
                            .map(|r| r["max_extra_pct"].as_f64().unwrap_or(0.0))
                            .collect(),
                        color: GREY,
                    },
                ],
                &rows
                    .iter()
                    .map(|r| r["target_mean_extra_pct"].as_f64())
                    .collect::<Vec<_>>(),
                "%",
            );
            md.push_str(&self.svg("disruption", chart)?);
            let _ = writeln!(
                md,
                "| change | trials | mean extra % | max extra % | target (mean) | mean total moved % |\n|---|---:|---:|---:|---:|---:|"
            );
            for r in rows {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.3} | {:.3} | {} | {:.3} |",
                    r["change"].as_str().unwrap_or(""),
                    r["trials"],
                    r["mean_extra_pct"].as_f64().unwrap_or(f64::NAN),
                    r["max_extra_pct"].as_f64().unwrap_or(f64::NAN),
                    r["target_mean_extra_pct"]
                        .as_f64()
                        .map_or("–".to_owned(), |t| format!("≤ {t}")),
                    r["mean_total_pct"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
        md.push('\n');
        Ok(())
    }

    fn memory(&self, md: &mut String) {
        let Some(v) = self.json("memory") else {
            return;
        };
        let _ = writeln!(
            md,
            "## Map memory\n\nKernel memory locked by the data plane's maps (1,000 backends, \
             65,537-slot tables, default connection tables).\n\n| Vips | MaglevTables MiB | \
             connection tables MiB | other MiB | total MiB |\n|---:|---:|---:|---:|---:|"
        );
        for r in v["rows"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                r["vips"],
                r["tables_mib"].as_f64().unwrap_or(f64::NAN),
                r["conntrack_mib"].as_f64().unwrap_or(f64::NAN),
                r["other_mib"].as_f64().unwrap_or(f64::NAN),
                r["total_mib"].as_f64().unwrap_or(f64::NAN)
            );
        }
        if let (Some(table), Some(lru)) = (
            v["conntrack_bytes_per_flow"].as_f64(),
            v["lru_hash_bytes_per_flow"].as_f64(),
        ) {
            let _ = writeln!(
                md,
                "\nConnection table: {table:.1} bytes per tracked flow (a kernel LRU hash of as \
                 many entries: {lru:.1})."
            );
        }
        md.push('\n');
    }

    fn failover(&self, md: &mut String) {
        let Some(v) = self.json("failover") else {
            return;
        };
        let check = &v["check"];
        let _ = writeln!(
            md,
            "## Failover\n\nThe real daemon in network namespaces, {} backends, {} health check \
             every {} ms (timeout {} ms, fall {}, rise {}), a short TCP connection every few ms \
             from the client; a backend's server killed, then restarted, round by round.\n",
            v["backends"],
            check["kind"].as_str().unwrap_or("?"),
            check["interval_ms"],
            check["timeout_ms"],
            check["fall"],
            check["rise"]
        );
        let _ = writeln!(
            md,
            "| backend | detection ms | detection to live table µs | back up to live µs | failed connections | of | failed after return |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for r in v["rounds"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {} | {} | {} | {} | {} |",
                r["backend"].as_str().unwrap_or(""),
                r["detect_ms"].as_f64().unwrap_or(f64::NAN),
                r["detect_to_live_us"],
                r["up_to_live_us"],
                r["failed"],
                r["connections"],
                r["failed_after_return"]
            );
        }
        let live = &v["detect_to_live_us"];
        let _ = writeln!(
            md,
            "\nDetection to live table: median {} µs, max {} µs (target ≤ {} µs). Failed \
             connections per backend failure: mean {}, max {}.\n",
            live["median"],
            live["max"],
            live["target"],
            v["failed_per_failure"]["mean"],
            v["failed_per_failure"]["max"]
        );
    }
}
