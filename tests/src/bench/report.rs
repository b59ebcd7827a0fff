//! The benchmark's result model: sections of rows, each figure beside a baseline measured in
//! the same run, printed as Markdown tables and written as JSON.
use serde_json::{json, Value};

/// A figure set beside another one measured in the same run.
#[derive(Clone, Debug)]
pub struct Baseline {
    pub name: String,
    pub value: f64,
}

/// The target a figure is held to (the verdict column of the report).
#[derive(Clone, Debug)]
pub struct Target {
    pub text: String,
    pub met: bool,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// The main baseline: the ratio is `value / baseline`.
    pub baseline: Option<Baseline>,
    /// Further baselines, each shown with its ratio.
    pub others: Vec<Baseline>,
    pub target: Option<Target>,
    pub note: String,
}

impl Row {
    pub fn new(name: impl Into<String>, value: f64, unit: impl Into<String>) -> Row {
        Row {
            name: name.into(),
            value,
            unit: unit.into(),
            baseline: None,
            others: Vec::new(),
            target: None,
            note: String::new(),
        }
    }
    pub fn baseline(mut self, name: impl Into<String>, value: f64) -> Row {
        self.baseline = Some(Baseline {
            name: name.into(),
            value,
        });
        self
    }
    pub fn other(mut self, name: impl Into<String>, value: f64) -> Row {
        self.others.push(Baseline {
            name: name.into(),
            value,
        });
        self
    }
    pub fn target(mut self, text: impl Into<String>, met: bool) -> Row {
        self.target = Some(Target {
            text: text.into(),
            met,
        });
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }
    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "value": finite(self.value),
            "unit": self.unit,
            "baseline": self.baseline.as_ref().map(|b| json!({
                "name": b.name, "value": finite(b.value), "ratio": finite(ratio(self.value, b.value)),
            })),
            "other_baselines": self.others.iter().map(|b| json!({
                "name": b.name, "value": finite(b.value), "ratio": finite(ratio(self.value, b.value)),
            })).collect::<Vec<_>>(),
            "target": self.target.as_ref().map(|t| json!({"text": t.text, "met": t.met})),
            "note": self.note,
        })
    }
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::NAN
    } else {
        a / b
    }
}

fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

#[derive(Clone, Debug)]
pub struct Section {
    pub id: String,
    pub title: String,
    pub method: String,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    /// Raw measurements, for the JSON only.
    pub data: Value,
}

impl Section {
    pub fn new(id: &str, title: &str) -> Section {
        Section {
            id: id.into(),
            title: title.into(),
            method: String::new(),
            rows: Vec::new(),
            notes: Vec::new(),
            data: json!({}),
        }
    }
}

#[derive(Default)]
pub struct Report {
    pub machine: Value,
    pub mode: String,
    pub sections: Vec<Section>,
    pub errors: Vec<String>,
}

impl Report {
    /// The section with this id, created (with this title) if missing.
    pub fn section(&mut self, id: &str, title: &str) -> &mut Section {
        if let Some(i) = self.sections.iter().position(|s| s.id == id) {
            return &mut self.sections[i];
        }
        self.sections.push(Section::new(id, title));
        self.sections.last_mut().unwrap()
    }

    pub fn json(&self, elapsed_secs: f64) -> Value {
        json!({
            "machine": self.machine,
            "mode": self.mode,
            "elapsed_secs": elapsed_secs,
            "errors": self.errors,
            "sections": self.sections.iter().map(|s| json!({
                "id": s.id,
                "title": s.title,
                "method": s.method,
                "rows": s.rows.iter().map(Row::json).collect::<Vec<_>>(),
                "notes": s.notes,
                "data": s.data,
            })).collect::<Vec<_>>(),
        })
    }

    /// The whole report as Markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for s in &self.sections {
            out.push_str(&format!("\n### {}\n\n", s.title));
            if !s.method.is_empty() {
                out.push_str(&format!("Method: {}\n\n", s.method));
            }
            if !s.rows.is_empty() {
                out.push_str(&table(&s.rows));
            }
            for n in &s.notes {
                out.push_str(&format!("\n- {n}"));
            }
            if !s.notes.is_empty() {
                out.push('\n');
            }
        }
        if !self.errors.is_empty() {
            out.push_str("\n### Errors\n\n");
            for e in &self.errors {
                out.push_str(&format!("- {e}\n"));
            }
        }
        out
    }
}

/// A value with a sensible number of digits.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}e9", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 100.0 {
        format!("{:.0}", v)
    } else if a >= 10.0 {
        format!("{:.1}", v)
    } else if a >= 1.0 {
        format!("{:.2}", v)
    } else {
        format!("{:.3}", v)
    }
}

pub fn times(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "n/a".into()
    }
}

fn table(rows: &[Row]) -> String {
    let mut lines: Vec<[String; 7]> = vec![[
        "figure".into(),
        "value".into(),
        "baseline (same run)".into(),
        "ratio".into(),
        "other baselines".into(),
        "target".into(),
        "verdict".into(),
    ]];
    for r in rows {
        let unit = |v: f64| format!("{} {}", num(v), r.unit);
        let (base, rat) = match &r.baseline {
            Some(b) => (
                format!("{}: {}", b.name, unit(b.value)),
                times(ratio(r.value, b.value)),
            ),
            None => ("-".into(), "-".into()),
        };
        let others = if r.others.is_empty() {
            "-".to_string()
        } else {
            r.others
                .iter()
                .map(|b| {
                    format!(
                        "{}: {} ({})",
                        b.name,
                        unit(b.value),
                        times(ratio(r.value, b.value))
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let (target, verdict) = match &r.target {
            Some(t) => (
                t.text.clone(),
                if t.met { "met" } else { "MISSED" }.to_string(),
            ),
            None => ("-".into(), "-".into()),
        };
        let name = if r.note.is_empty() {
            r.name.clone()
        } else {
            format!("{} ({})", r.name, r.note)
        };
        lines.push([name, unit(r.value), base, rat, others, target, verdict]);
    }
    let mut w = [0usize; 7];
    for l in &lines {
        for (i, c) in l.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for (n, l) in lines.iter().enumerate() {
        out.push('|');
        for (i, c) in l.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            out.push_str(&format!(" {c}{} |", " ".repeat(pad)));
        }
        out.push('\n');
        if n == 0 {
            out.push('|');
            for wi in w {
                out.push_str(&format!("{}|", "-".repeat(wi + 2)));
            }
            out.push('\n');
        }
    }
    out
}

/// Median of the values (NaN for none).
pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[idx.min(s.len() - 1)]
}

/// A small deterministic PRNG (xorshift64*), so runs pick the same flows.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}
