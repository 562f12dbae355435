//! Parse-and-plan benchmark of the Dockerfile frontend (see `bench/parse/run.sh`).
//!
//! `parse_bench generate N` prints a synthetic Dockerfile of N instructions (stages of mixed
//! instructions: ARG, ENV, RUN with continuations, mounts and heredocs, COPY --from, LABEL, …).
//! `parse_bench run FILE [ITERATIONS]` parses, converts and plans FILE repeatedly in-process
//! and prints min / median / mean wall time per phase.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use kiln_dockerfile::plan::PlanOptions;

/// A deterministic Dockerfile with exactly `n` instructions (n ≥ 2).
fn generate(n: usize) -> String {
    let per_stage = 200;
    let mut out = String::from(
        "# syntax=docker/dockerfile:1\nARG BASE=debian:bookworm-slim\nARG VERSION=1.0\n",
    );
    let mut count = 2;
    let mut stage = 0;
    while count < n {
        let _ = writeln!(out, "\nFROM ${{BASE}} AS stage{stage}");
        count += 1;
        if count < n {
            let _ = writeln!(out, "ARG VERSION");
            count += 1;
        }
        let mut i = 0;
        while count < n && i < per_stage {
            match i % 10 {
                0 => {
                    let _ = writeln!(
                        out,
                        "ENV APP_HOME=/opt/app{stage} PATH=/opt/app{stage}/bin:$PATH"
                    );
                }
                1 => {
                    let _ = writeln!(
                        out,
                        "RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \\\n    apt-get update && \\\n    apt-get install -y --no-install-recommends pkg{i} && \\\n    rm -rf /var/lib/apt/lists/*"
                    );
                }
                2 => {
                    let _ = writeln!(out, "WORKDIR ${{APP_HOME}}/src{i}");
                }
                3 => {
                    let _ = writeln!(out, "COPY --chown=1000:1000 --chmod=644 src/{i}/ ./{i}/");
                }
                4 => {
                    let _ = writeln!(
                        out,
                        "LABEL org.example.step{i}=\"value {i}\" org.example.version=${{VERSION}}"
                    );
                }
                5 => {
                    let _ = writeln!(out, "RUN <<EOF\nset -e\necho step {i} > /tmp/step{i}\nEOF");
                }
                6 => {
                    if stage > 0 {
                        let _ = writeln!(
                            out,
                            "COPY --from=stage{} /opt/app{}/ /opt/prev/",
                            stage - 1,
                            stage - 1
                        );
                    } else {
                        let _ = writeln!(out, "COPY --link a{i} b{i} /dst/");
                    }
                }
                7 => {
                    let _ = writeln!(out, "ARG OPT{i}=default-{i}");
                }
                8 => {
                    let _ = writeln!(out, "RUN [\"/bin/sh\", \"-c\", \"echo {i} && true\"]");
                }
                _ => {
                    let _ = writeln!(out, "USER app:app");
                }
            }
            count += 1;
            i += 1;
        }
        stage += 1;
    }
    out
}

fn stats(label: &str, samples: &mut [Duration]) {
    samples.sort();
    let min = samples[0];
    let median = samples[samples.len() / 2];
    let total: Duration = samples.iter().sum();
    let mean = total / u32::try_from(samples.len()).unwrap_or(u32::MAX);
    println!(
        "{label:<22} min {:>8.3} ms   median {:>8.3} ms   mean {:>8.3} ms",
        min.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e3,
        mean.as_secs_f64() * 1e3
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("generate") => {
            let n: usize = args.get(2).map_or(Ok(2000), |s| s.parse())?;
            print!("{}", generate(n.max(2)));
            Ok(())
        }
        Some("run") => {
            let path = args.get(2).ok_or("usage: parse_bench run FILE [ITERATIONS]")?;
            let iterations: usize = args.get(3).map_or(Ok(200), |s| s.parse())?;
            let text = std::fs::read_to_string(path)?;
            let opts = PlanOptions::default();
            // Warm up and check the input once.
            let parsed = kiln_dockerfile::parse_instructions(&text)?;
            let plan = kiln_dockerfile::plan_dockerfile(&text, &opts)?;
            println!(
                "{path}: {} bytes, {} instructions, {} stages, {iterations} iterations",
                text.len(),
                parsed.instructions.len(),
                plan.stages.len()
            );
            let (mut parse, mut planned, mut total) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..iterations.max(1) {
                let t0 = Instant::now();
                let ins = kiln_dockerfile::parse_instructions(&text)?;
                let t1 = Instant::now();
                let p = kiln_dockerfile::plan::plan(&ins.instructions, &opts)?;
                let t3 = Instant::now();
                std::hint::black_box(&p);
                parse.push(t1 - t0);
                planned.push(t3 - t1);
                total.push(t3 - t0);
            }
            stats("parse + typed", &mut parse);
            stats("plan (stages, args)", &mut planned);
            stats("total", &mut total);
            Ok(())
        }
        _ => Err("usage: parse_bench generate [N] | parse_bench run FILE [ITERATIONS]".into()),
    }
}
