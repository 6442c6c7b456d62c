//! `mpool bench <scenario|all> [--quick] [--json FILE]`: the benchmark suite.
//!
//! Every scenario starts what it needs itself (the simulator in-process, `mpool serve`
//! in-process or as a process, an OpenSSH `sshd` on loopback), measures mpool AND its baseline
//! in the same run, and reports absolute figures, the baseline and their ratio (these machines
//! are noisy: only the ratio of two numbers taken minutes apart means much). It prints a table
//! to stdout and writes JSON (default `target/bench/<scenario>.json`). Benchmarks report; they
//! never fail on a missed target.
//!
//! Scenarios (one file each): [`control`] (1), [`throughput`] (2), [`daemon_calls`] (3),
//! [`exec`] (4), [`e2e`] (5), [`storm`] (6), [`scale`] (7), [`chaos`] (8), [`autoscale`] (9),
//! [`fleet`] (10).
//! Shared parts: the `mpool_testkit` crate (the simulator, the daemon, clients, a real OpenSSH
//! server), [`measure`] (timed API calls and processes), and the statistics, table and JSON below.

pub mod autoscale;
pub mod chaos;
pub mod control;
pub mod daemon_calls;
pub mod e2e;
pub mod exec;
pub mod fleet;
pub mod measure;
pub mod scale;
pub mod storm;
pub mod throughput;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cli::output;
use serde::Serialize;

/// `mpool bench` flags.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// control | throughput | daemon-calls | exec | e2e | storm | scale | chaos | autoscale | fleet
    /// (or 1-10),
    /// or all.
    scenario: String,
    /// Fewer iterations and faster simulated timings (a CI smoke run; not the README figures).
    #[arg(long)]
    quick: bool,
    /// Write the JSON report here (default target/bench/<scenario>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What every scenario gets.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Shrink iteration counts and time scales.
    pub quick: bool,
    /// This binary (for spawning `mpool multipass ...` and `mpool serve` processes).
    pub exe: PathBuf,
}

impl Ctx {
    /// `full` normally, `quick` with `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}

type Run = for<'a> fn(&'a Ctx) -> Pin<Box<dyn Future<Output = Result<Report, String>> + 'a>>;

/// The scenarios, in order: (name, number, what it measures, entry point).
pub const SCENARIOS: &[(&str, u8, &str, Run)] = &[
    ("control", 1, "control-plane overhead: hot acquire over gRPC, 1/8/32 clients", |c| Box::pin(control::run(c))),
    ("throughput", 2, "lease throughput: acquire -> release -> reset complete, 16 VMs", |c| {
        Box::pin(throughput::run(c))
    }),
    ("daemon-calls", 3, "daemon call overhead: persistent TLS channel vs a process per call", |c| {
        Box::pin(daemon_calls::run(c))
    }),
    ("exec", 4, "exec `true`: pooled SSH connection vs a fresh one per command", |c| Box::pin(exec::run(c))),
    ("e2e", 5, "end to end at realistic timings vs the shell recipe", |c| Box::pin(e2e::run(c))),
    ("storm", 6, "release storm: warm acquires while 20 resets are pending", |c| Box::pin(storm::run(c))),
    ("scale", 7, "memory and scale: mpool serve with 500 VMs, restart and reconcile", |c| Box::pin(scale::run(c))),
    ("chaos", 8, "chaos: daemon faults, store write failures, kill -9; promises counted", |c| Box::pin(chaos::run(c))),
    ("autoscale", 9, "pools that size themselves: a bursty trace, static min_ready vs demand", |c| {
        Box::pin(autoscale::run(c))
    }),
    ("fleet", 10, "two hosts as one: hot acquires routed by the client vs one host direct", |c| {
        Box::pin(fleet::run(c))
    }),
];

// ---------------------------------------------------------------------------------- stats

/// Order statistics of a set of durations, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Minimum.
    pub min_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile (nearest rank).
    pub p95_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The nearest-rank percentile `p` (0-1) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises samples (any order).
pub fn summarize(samples: &[Duration]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    let mut s = samples.to_vec();
    s.sort();
    let total: Duration = s.iter().sum();
    Summary {
        n: s.len(),
        min_ms: ms(s[0]),
        p50_ms: ms(percentile(&s, 0.50)),
        p95_ms: ms(percentile(&s, 0.95)),
        p99_ms: ms(percentile(&s, 0.99)),
        max_ms: ms(s[s.len() - 1]),
        mean_ms: ms(total) / s.len() as f64,
    }
}

// ---------------------------------------------------------------------------------- report

/// One line of the table: mpool's figure, its baseline from the same run, their ratio, the
/// target.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What is measured (mpool's side).
    pub figure: String,
    /// mpool's value.
    pub value: f64,
    /// Unit of `value` and `baseline`.
    pub unit: String,
    /// What the baseline is.
    pub baseline_name: String,
    /// The baseline's value (same unit), when there is one.
    pub baseline: Option<f64>,
    /// The ratio (see `ratio_means`).
    pub ratio: Option<f64>,
    /// How to read the ratio, e.g. "x faster" or "x of idle".
    pub ratio_means: String,
    /// The target, in words.
    pub target: Option<String>,
    /// Whether the target was met (None: no target).
    pub met: Option<bool>,
}

impl Row {
    /// A row without baseline or target.
    pub fn new(figure: impl Into<String>, value: f64, unit: &str) -> Row {
        Row {
            figure: figure.into(),
            value,
            unit: unit.into(),
            baseline_name: String::new(),
            baseline: None,
            ratio: None,
            ratio_means: String::new(),
            target: None,
            met: None,
        }
    }

    /// Adds a baseline; the ratio is baseline / value ("x faster" for times, where lower is
    /// better).
    pub fn vs(mut self, name: impl Into<String>, baseline: f64) -> Row {
        self.baseline_name = name.into();
        self.baseline = Some(baseline);
        self.ratio = (self.value > 0.0).then(|| baseline / self.value);
        self.ratio_means = "x faster".into();
        self
    }

    /// Adds a baseline for a rate (higher is better): ratio = value / baseline.
    pub fn vs_rate(mut self, name: impl Into<String>, baseline: f64) -> Row {
        self.baseline_name = name.into();
        self.baseline = Some(baseline);
        self.ratio = (baseline > 0.0).then(|| self.value / baseline);
        self.ratio_means = "x more".into();
        self
    }

    /// Adds a baseline the value is compared against as a slowdown: ratio = value / baseline.
    pub fn of(mut self, name: impl Into<String>, baseline: f64, means: &str) -> Row {
        self.baseline_name = name.into();
        self.baseline = Some(baseline);
        self.ratio = (baseline > 0.0).then(|| self.value / baseline);
        self.ratio_means = means.into();
        self
    }

    /// Sets the target and whether it was met.
    pub fn target(mut self, target: impl Into<String>, met: bool) -> Row {
        self.target = Some(target.into());
        self.met = Some(met);
        self
    }
}

/// The machine the figures come from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// RAM.
    pub memory_mb: u64,
    /// Kernel release.
    pub kernel: String,
    /// 1-minute load average when the scenario started (other work on the machine).
    pub load_before: f64,
    /// Median fsync latency of the benchmark's temp dir (bounds every durable write).
    pub fsync_p50_ms: f64,
    /// `release` or `debug`.
    pub build: String,
}

/// One scenario's result.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Scenario number (1-10).
    pub number: u8,
    /// One-line description.
    pub title: String,
    /// The command that reproduces it.
    pub command: String,
    /// `--quick`.
    pub quick: bool,
    /// Where it ran.
    pub machine: Option<Machine>,
    /// Wall time of the scenario.
    pub elapsed_s: f64,
    /// The table.
    pub rows: Vec<Row>,
    /// What bounds the numbers, skipped parts, scaling.
    pub notes: Vec<String>,
    /// Everything measured (summaries per configuration).
    pub details: serde_json::Value,
}

impl Report {
    /// An empty report for `scenario`.
    pub fn new(scenario: &str) -> Report {
        let (number, title) =
            SCENARIOS.iter().find(|s| s.0 == scenario).map(|s| (s.1, s.2.to_string())).unwrap_or((0, String::new()));
        Report {
            scenario: scenario.into(),
            number,
            title,
            command: String::new(),
            quick: false,
            machine: None,
            elapsed_s: 0.0,
            rows: vec![],
            notes: vec![],
            details: serde_json::json!({}),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, r: Row) {
        self.rows.push(r);
    }

    /// Adds a note.
    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    /// Records a detail under `key`.
    pub fn detail(&mut self, key: &str, value: impl Serialize) {
        if let serde_json::Value::Object(m) = &mut self.details {
            m.insert(key.into(), serde_json::to_value(value).unwrap_or(serde_json::Value::Null));
        }
    }
}

/// A value with its unit, compactly.
pub fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "ms" if v >= 10_000.0 => format!("{:.1} s", v / 1e3),
        "ms" if v >= 100.0 => format!("{v:.0} ms"),
        "ms" if v >= 10.0 => format!("{v:.1} ms"),
        "ms" => format!("{v:.2} ms"),
        "s" if v < 0.1 => format!("{:.1} ms", v * 1e3),
        "s" if v < 10.0 => format!("{v:.2} s"),
        "s" => format!("{v:.1} s"),
        "MB" => format!("{v:.1} MB"),
        "KB" => format!("{v:.1} KB"),
        _ if v >= 100.0 => format!("{v:.0} {unit}"),
        _ => format!("{v:.1} {unit}"),
    }
}

fn fmt_ratio(r: &Row) -> String {
    match r.ratio {
        Some(x) if x >= 100.0 => format!("{x:.0}{}", r.ratio_means),
        Some(x) if x >= 10.0 => format!("{x:.1}{}", r.ratio_means),
        Some(x) => format!("{x:.2}{}", r.ratio_means),
        None => "-".into(),
    }
}

fn met(r: &Row) -> &'static str {
    match r.met {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "",
    }
}

/// Prints rows as a table.
pub fn print_table(rows: &[(String, Row)]) {
    let head = ["#", "figure", "mpool", "baseline", "ratio", "target", ""];
    let lines: Vec<[String; 7]> = rows
        .iter()
        .map(|(s, r)| {
            let baseline = match r.baseline {
                Some(b) => format!("{} ({})", fmt_value(b, &r.unit), r.baseline_name),
                None => "-".into(),
            };
            [
                s.clone(),
                r.figure.clone(),
                fmt_value(r.value, &r.unit),
                baseline,
                fmt_ratio(r),
                r.target.clone().unwrap_or_default(),
                met(r).into(),
            ]
        })
        .collect();
    let mut width = head.map(|h| h.len());
    for l in &lines {
        for (i, c) in l.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            s.push_str(c);
            s.push_str(&" ".repeat(pad));
            s.push_str("  ");
        }
        output::line(s.trim_end());
    };
    line(&head.map(String::from));
    line(&width.map(|w| "-".repeat(w)));
    for l in &lines {
        line(l);
    }
}

// ---------------------------------------------------------------------------------- machine

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn meminfo_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Median latency of 20 fsyncs of a 4 KiB write in `dir`.
pub fn fsync_p50(dir: &Path) -> f64 {
    use std::io::Write;
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let Ok(mut f) = std::fs::File::create(&path) else { return 0.0 };
    let mut samples = Vec::new();
    for _ in 0..20 {
        let _ = f.write_all(&[0u8; 4096]);
        let t = Instant::now();
        let _ = f.sync_all();
        samples.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    summarize(&samples).p50_ms
}

fn machine() -> Machine {
    Machine {
        cpu: cpu_model(),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        memory_mb: meminfo_mb(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default(),
        load_before: loadavg(),
        fsync_p50_ms: fsync_p50(&std::env::temp_dir()),
        build: if cfg!(debug_assertions) { "debug".into() } else { "release".into() },
    }
}

// ---------------------------------------------------------------------------------- running

fn find(name: &str) -> Option<&'static (&'static str, u8, &'static str, Run)> {
    let n = name.trim().to_ascii_lowercase().replace('_', "-");
    SCENARIOS.iter().find(|s| s.0 == n || s.1.to_string() == n)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

async fn run_one(ctx: &Ctx, s: &(&'static str, u8, &'static str, Run)) -> Report {
    let machine = machine();
    output::line(&format!("\n== {} ({}): {}{}", s.1, s.0, s.2, if ctx.quick { " [--quick]" } else { "" }));
    let started = Instant::now();
    let mut report = match (s.3)(ctx).await {
        Ok(r) => r,
        Err(e) => {
            output::err_line(&format!("mpool bench {}: {e}", s.0));
            let mut r = Report::new(s.0);
            r.note(format!("ERROR: {e}"));
            r.detail("error", e);
            r
        }
    };
    report.scenario = s.0.into();
    report.number = s.1;
    report.title = s.2.into();
    report.quick = ctx.quick;
    report.command = format!("mpool bench {}{}", s.0, if ctx.quick { " --quick" } else { "" });
    report.machine = Some(machine);
    report.elapsed_s = started.elapsed().as_secs_f64();
    let rows: Vec<(String, Row)> = report.rows.iter().map(|r| (s.1.to_string(), r.clone())).collect();
    output::line("");
    print_table(&rows);
    for n in &report.notes {
        output::line(&format!("  note: {n}"));
    }
    output::line(&format!("  ({:.1} s)", report.elapsed_s));
    report
}

/// Runs `mpool bench`.
pub async fn run(args: BenchArgs) -> ExitCode {
    match std::env::current_exe() {
        Ok(exe) => run_with(exe, &args.scenario, args.quick, args.json).await,
        Err(e) => {
            output::err_line(&format!("mpool bench: cannot find this binary: {e}"));
            ExitCode::from(2)
        }
    }
}

/// Runs `scenario` (a name, a number or `all`) with `exe` as the `mpool` binary to spawn
/// (`cargo bench` passes the one cargo built).
pub async fn run_with(exe: PathBuf, scenario: &str, quick: bool, json: Option<PathBuf>) -> ExitCode {
    let args = BenchArgs { scenario: scenario.to_string(), quick, json };
    let ctx = Ctx { quick: args.quick, exe };
    let all = args.scenario.eq_ignore_ascii_case("all");
    let chosen: Vec<_> = if all {
        SCENARIOS.iter().collect()
    } else {
        match find(&args.scenario) {
            Some(s) => vec![s],
            None => {
                let names: Vec<&str> = SCENARIOS.iter().map(|s| s.0).collect();
                output::err_line(&format!(
                    "mpool bench: unknown scenario {:?}; one of {}, or all",
                    args.scenario,
                    names.join(", ")
                ));
                return ExitCode::from(2);
            }
        }
    };
    let build = if cfg!(debug_assertions) { "debug build" } else { "release build" };
    output::line(&format!(
        "mpool bench: {} scenario(s), {build}{}",
        chosen.len(),
        if ctx.quick { ", --quick" } else { "" }
    ));
    let started = Instant::now();
    let mut reports = Vec::new();
    let mut failed = false;
    for s in chosen {
        let r = run_one(&ctx, s).await;
        failed |= r.details.get("error").is_some();
        let path = match (&args.json, all) {
            (Some(p), false) => p.clone(),
            _ => PathBuf::from("target/bench").join(format!("{}.json", s.0)),
        };
        if let Err(e) = write_json(&path, &r) {
            output::err_line(&format!("mpool bench: cannot write {}: {e}", path.display()));
        }
        reports.push(r);
    }
    if all {
        let rows: Vec<(String, Row)> =
            reports.iter().flat_map(|r| r.rows.iter().map(move |row| (r.number.to_string(), row.clone()))).collect();
        output::line(&format!("\n== all scenarios ({:.0} s)", started.elapsed().as_secs_f64()));
        print_table(&rows);
        let path = args.json.clone().unwrap_or_else(|| PathBuf::from("target/bench/all.json"));
        let doc = serde_json::json!({
            "command": format!("mpool bench all{}", if ctx.quick { " --quick" } else { "" }),
            "elapsed_s": started.elapsed().as_secs_f64(),
            "reports": reports,
        });
        if let Err(e) = write_json(&path, &doc) {
            output::err_line(&format!("mpool bench: cannot write {}: {e}", path.display()));
        } else {
            output::line(&format!("JSON: {}", path.display()));
        }
    }
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}
