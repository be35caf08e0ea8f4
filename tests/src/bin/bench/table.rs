//! The benchmark's output: one row per budget.

#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<[String; 4]>,
}

impl Table {
    /// A measured figure against its budget; `met` says whether the budget holds.
    pub fn row(&mut self, what: &str, budget: &str, measured: String, met: Option<bool>) {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "info",
        };
        self.rows.push([
            what.to_owned(),
            budget.to_owned(),
            measured,
            verdict.to_owned(),
        ]);
    }

    pub fn print(&self) {
        let widths: Vec<usize> = (0..4)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].len())
                    .max()
                    .unwrap_or(0)
                    .max(8)
            })
            .collect();
        let line = |cells: [&str; 4]| {
            let cells: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            println!("| {} |", cells.join(" | "));
        };
        line(["what", "budget", "measured", "verdict"]);
        let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        println!("| {} |", dashes.join(" | "));
        for r in &self.rows {
            line([&r[0], &r[1], &r[2], &r[3]]);
        }
    }
}

/// The median and the 10th and 90th percentiles of `samples` (sorted in place).
pub fn spread(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.1), at(0.9))
}
