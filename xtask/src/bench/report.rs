//! The benchmark's results and their three renderings: JSON (`bench.json`), a Markdown table
//! for the README (`bench.md`) and an SVG plot of build time against closure size per tool
//! (`bench.svg`, drawn by hand: axes, one polyline per tool, a legend).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::closure_gen::GeneratedClosure;
use super::{size_label, RunStats};

#[derive(Debug, Serialize)]
pub struct Report {
    machine: Machine,
    runs: usize,
    seed: u64,
    /// The closure file and store directory benchmarked, when not a generated closure.
    corpus: Option<String>,
    closures: Vec<ClosureRow>,
    /// Median cost of every tool at every size.
    tools: Vec<ToolRow>,
    /// Ours against each peer of the same format, from the same runs.
    builder: Vec<Comparison>,
    verifier: Verifier,
}

#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    load_avg_1m_at_start: f64,
    mkfs_erofs: String,
}

#[derive(Debug, Serialize)]
struct ClosureRow {
    size_bytes: u64,
    store_paths: usize,
    files: usize,
    symlinks: usize,
    file_bytes: u64,
    nar_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
struct ToolRow {
    size_bytes: u64,
    tool: String,
    format: String,
    ours: bool,
    stats: RunStats,
}

#[derive(Debug, Serialize)]
struct Comparison {
    format: String,
    peer: String,
    size_bytes: u64,
    /// ours / peer, wall time.
    time_ratio: f64,
    /// ours / peer, image bytes.
    size_ratio: f64,
    cpu_ratio: f64,
    rss_ratio: f64,
    ours: RunStats,
    peer_stats: RunStats,
}

#[derive(Debug, Default, Serialize)]
struct Verifier {
    /// Median throughput over every image of the largest closure (MB of NAR per second).
    mb_per_s: Option<f64>,
    /// The slowest image of the largest closure.
    min_mb_per_s: Option<f64>,
    max_rss_mb: Option<f64>,
    /// Runs of `storedisk verify` per image (each row is their median).
    runs_per_image: usize,
    runs: Vec<VerifyRow>,
    /// Images whose verify throughput was not measured, and why.
    skipped: Vec<String>,
}

#[derive(Debug, Serialize)]
struct VerifyRow {
    size_bytes: u64,
    image_tool: String,
    format: String,
    nar_bytes: u64,
    mb_per_s: f64,
    stats: RunStats,
}

impl Report {
    pub fn new(cores: usize, runs: usize, seed: u64, load: f64, mkfs_erofs: &Path) -> Self {
        Report {
            machine: Machine {
                cores,
                load_avg_1m_at_start: load,
                mkfs_erofs: mkfs_erofs.display().to_string(),
            },
            runs,
            seed,
            corpus: None,
            closures: Vec::new(),
            tools: Vec::new(),
            builder: Vec::new(),
            verifier: Verifier::default(),
        }
    }

    /// `storedisk verify` is run `runs` times per image.
    pub fn set_verify_runs(&mut self, runs: usize) {
        self.verifier.runs_per_image = runs;
    }

    /// Says the closure came from `what` (`--closure FILE --store-dir DIR`), not the generator.
    pub fn set_corpus(&mut self, what: String) {
        self.corpus = Some(what);
    }

    pub fn add_closure(&mut self, size: u64, c: &GeneratedClosure) {
        self.closures.push(ClosureRow {
            size_bytes: size,
            store_paths: c.store_paths,
            files: c.files,
            symlinks: c.symlinks,
            file_bytes: c.file_bytes,
            nar_bytes: c.nar_bytes,
        });
    }

    pub fn add_tool(&mut self, size: u64, tool: &str, format: &str, ours: bool, stats: RunStats) {
        self.tools.push(ToolRow {
            size_bytes: size,
            tool: tool.to_owned(),
            format: format.to_owned(),
            ours,
            stats,
        });
    }

    pub fn add_comparison(
        &mut self,
        size: u64,
        format: &str,
        peer: &str,
        ours: RunStats,
        theirs: RunStats,
    ) {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        self.builder.push(Comparison {
            format: format.to_owned(),
            peer: peer.to_owned(),
            size_bytes: size,
            time_ratio: ratio(ours.wall_s, theirs.wall_s),
            size_ratio: ratio(ours.image_bytes as f64, theirs.image_bytes as f64),
            cpu_ratio: ratio(ours.cpu_s, theirs.cpu_s),
            rss_ratio: ratio(ours.max_rss_mb, theirs.max_rss_mb),
            ours,
            peer_stats: theirs,
        });
    }

    pub fn add_verify(
        &mut self,
        size: u64,
        tool: &str,
        format: &str,
        nar_bytes: u64,
        stats: RunStats,
        mb_per_s: f64,
    ) {
        self.verifier.runs.push(VerifyRow {
            size_bytes: size,
            image_tool: tool.to_owned(),
            format: format.to_owned(),
            nar_bytes,
            mb_per_s,
            stats,
        });
        let largest = self
            .verifier
            .runs
            .iter()
            .map(|r| r.size_bytes)
            .max()
            .unwrap_or(0);
        let mut at_largest: Vec<&VerifyRow> = self
            .verifier
            .runs
            .iter()
            .filter(|r| r.size_bytes == largest)
            .collect();
        at_largest.sort_by(|a, b| a.mb_per_s.total_cmp(&b.mb_per_s));
        self.verifier.mb_per_s = Some(at_largest[at_largest.len() / 2].mb_per_s);
        self.verifier.min_mb_per_s = at_largest.first().map(|r| r.mb_per_s);
        self.verifier.max_rss_mb = self
            .verifier
            .runs
            .iter()
            .map(|r| r.stats.max_rss_mb)
            .max_by(|a, b| a.total_cmp(b));
    }

    pub fn verify_skipped(&mut self, reason: String) {
        self.verifier.skipped.push(reason);
    }

    /// Writes `path` (JSON) and, beside it, the `.md` table and the `.svg` plot.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        std::fs::write(path.with_extension("md"), self.markdown())?;
        std::fs::write(path.with_extension("svg"), self.svg())?;
        Ok(())
    }

    /// The table printed at the end of a run (same as the Markdown).
    pub fn table(&self) -> String {
        self.markdown()
    }

    fn ours_for(&self, size: u64, format: &str) -> Option<&ToolRow> {
        self.tools
            .iter()
            .find(|t| t.ours && t.size_bytes == size && t.format == format)
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let closure = match &self.corpus {
            Some(what) => format!("the closure {what}"),
            None => format!("generated NixOS-like closure (seed {})", self.seed),
        };
        let _ = writeln!(
            md,
            "Median of {} run(s), {} cores, {closure}, warm page cache.\n",
            self.runs, self.machine.cores
        );
        md.push_str(
            "| closure | format | tool | wall s | CPU s | peak RSS MB | image MB | time ours/peer | size ours/peer |\n",
        );
        md.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|\n");
        for t in &self.tools {
            let closure = self.closures.iter().find(|c| c.size_bytes == t.size_bytes);
            let label = closure.map_or(size_label(t.size_bytes), |c| {
                format!("{} ({} files)", size_label(c.file_bytes), c.files)
            });
            let (time_ratio, size_ratio) = match (t.ours, self.ours_for(t.size_bytes, &t.format)) {
                (false, Some(ours)) => (
                    format!("{:.2}", ours.stats.wall_s / t.stats.wall_s),
                    format!(
                        "{:.3}",
                        ours.stats.image_bytes as f64 / t.stats.image_bytes as f64
                    ),
                ),
                _ => (String::new(), String::new()),
            };
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {:.2} | {:.2} | {:.0} | {:.1} | {time_ratio} | {size_ratio} |",
                t.format,
                if t.ours { format!("**{}**", t.tool) } else { t.tool.clone() },
                t.stats.wall_s,
                t.stats.cpu_s,
                t.stats.max_rss_mb,
                t.stats.image_bytes as f64 / 1e6,
            );
        }
        md.push('\n');
        for reason in &self.verifier.skipped {
            let _ = writeln!(md, "`storedisk verify` not measured on the {reason}\n");
        }
        if !self.verifier.runs.is_empty() {
            let _ = writeln!(
                md,
                "`storedisk verify`: median of {} runs per image.\n",
                self.verifier.runs_per_image
            );
            md.push_str(
                "| closure | `storedisk verify --closure` on the image of | wall s | MB/s of NAR | peak RSS MB |\n",
            );
            md.push_str("|---|---|---:|---:|---:|\n");
            for v in &self.verifier.runs {
                let _ = writeln!(
                    md,
                    "| {} | {} {} | {:.2} | {:.0} | {:.0} |",
                    size_label(v.size_bytes),
                    v.image_tool,
                    v.format,
                    v.stats.wall_s,
                    v.mb_per_s,
                    v.stats.max_rss_mb
                );
            }
        }
        md
    }

    /// Build time against closure size, one polyline per tool and format.
    pub fn svg(&self) -> String {
        let (w, h) = (720.0, 440.0);
        let (left, right, top, bottom) = (70.0, 200.0, 30.0, 50.0);
        let max_x = self
            .closures
            .iter()
            .map(|c| c.file_bytes as f64 / 1e6)
            .fold(1.0, f64::max);
        let max_y = self
            .tools
            .iter()
            .map(|t| t.stats.wall_s)
            .fold(0.1, f64::max);
        let x = |mb: f64| left + mb / max_x * (w - left - right);
        let y = |s: f64| h - bottom - s / max_y * (h - top - bottom);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{left}" y="18" font-size="14">Image build time vs closure size ({} cores, median of {})</text>"#,
            self.machine.cores, self.runs
        );
        // Axes with five ticks each.
        let _ = writeln!(
            svg,
            r#"<path d="M{left} {top} V{} H{}" stroke="black" fill="none"/>"#,
            h - bottom,
            w - right
        );
        for i in 0..=5 {
            let fx = max_x * i as f64 / 5.0;
            let fy = max_y * i as f64 / 5.0;
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{fx:.0}</text><text x="{}" y="{:.1}" text-anchor="end">{fy:.1}</text>"#,
                x(fx),
                h - bottom + 16.0,
                left - 6.0,
                y(fy) + 4.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">closure file data (MB)</text><text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">wall time (s)</text>"#,
            (left + w - right) / 2.0,
            h - 12.0,
            h / 2.0,
            h / 2.0
        );
        let colors = [
            "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
        ];
        let mut series: Vec<(String, bool)> = Vec::new();
        for t in &self.tools {
            let key = (format!("{} {}", t.tool, t.format), t.ours);
            if !series.contains(&key) {
                series.push(key);
            }
        }
        for (i, (name, ours)) in series.iter().enumerate() {
            let color = colors[i % colors.len()];
            let points: Vec<(f64, f64)> = self
                .tools
                .iter()
                .filter(|t| &format!("{} {}", t.tool, t.format) == name)
                .filter_map(|t| {
                    let c = self
                        .closures
                        .iter()
                        .find(|c| c.size_bytes == t.size_bytes)?;
                    Some((x(c.file_bytes as f64 / 1e6), y(t.stats.wall_s)))
                })
                .collect();
            let path: Vec<String> = points
                .iter()
                .map(|(px, py)| format!("{px:.1},{py:.1}"))
                .collect();
            let dash = if *ours {
                ""
            } else {
                r#" stroke-dasharray="6 3""#
            };
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
            for (px, py) in &points {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{px:.1}" cy="{py:.1}" r="3" fill="{color}"/>"#
                );
            }
            let ly = top + 20.0 * i as f64;
            let _ = writeln!(
                svg,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{:.1}">{name}</text>"#,
                w - right + 10.0,
                w - right + 34.0,
                w - right + 40.0,
                ly + 4.0
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(wall_s: f64, image_bytes: u64) -> RunStats {
        RunStats {
            wall_s,
            image_bytes,
            cpu_s: wall_s * 2.0,
            max_rss_mb: 30.0,
            ..RunStats::default()
        }
    }

    #[test]
    fn ratios_tables_and_plot_come_from_the_measurements() {
        let mut r = Report::new(2, 3, 1, 0.1, Path::new("mkfs.erofs"));
        let closure = GeneratedClosure {
            store_dir: "s".into(),
            closure_json: "c".into(),
            roots: vec!["/nix/store/x".into()],
            store_paths: 10,
            files: 100,
            symlinks: 5,
            file_bytes: 40_000_000,
            nar_bytes: 41_000_000,
        };
        r.add_closure(40_000_000, &closure);
        r.add_tool(40_000_000, "storedisk", "squashfs", true, stats(2.0, 1_010));
        r.add_tool(
            40_000_000,
            "gensquashfs",
            "squashfs",
            false,
            stats(4.0, 1_000),
        );
        r.add_comparison(
            40_000_000,
            "squashfs",
            "gensquashfs",
            stats(2.0, 1_010),
            stats(4.0, 1_000),
        );
        r.set_verify_runs(9);
        r.add_verify(
            40_000_000,
            "storedisk",
            "squashfs",
            41_000_000,
            stats(0.1, 0),
            410.0,
        );
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["verifier"]["runs_per_image"], 9);
        assert_eq!(json["builder"][0]["time_ratio"], 0.5);
        assert_eq!(json["builder"][0]["size_ratio"], 1.01);
        assert_eq!(json["builder"][0]["peer"], "gensquashfs");
        assert_eq!(json["verifier"]["mb_per_s"], 410.0);
        let md = r.markdown();
        assert!(md.contains("| 0.50 | 1.010 |"), "{md}");
        assert!(md.contains("median of 9 runs per image"), "{md}");
        let svg = r.svg();
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert!(svg.contains("gensquashfs squashfs"));
    }
}
