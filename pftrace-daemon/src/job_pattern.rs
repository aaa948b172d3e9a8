//! What a job cgroup's name looks like: a pattern such as `job_{id}` (Slurm's
//! `job_<id>` directories) or `job{id}.scope` (`systemd-run --scope --unit=jobID`), with
//! `{id}` standing for the job id, `*` for any text, everything else literal.
//! Applied to the names of the job root's direct children only.

/// A parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPattern {
    text: String,
    /// Literal pieces and wildcards before `{id}`, and after it.
    before: Vec<Piece>,
    after: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Any,
}

/// A pattern that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobPatternError {
    #[error(
        "job pattern {0:?} has no {{id}}: write where the job id is in a job cgroup's name, e.g. \
         \"job_{{id}}\" (Slurm) or \"job{{id}}.scope\" (systemd-run --scope --unit=jobID)"
    )]
    NoId(String),
    #[error("job pattern {0:?} has {{id}} more than once; a name holds one job id")]
    TwoIds(String),
    #[error("job pattern {0:?} contains '/': it matches one cgroup name, the job root's direct children")]
    Slash(String),
}

/// The longest job id kept (a cgroup name has at most 255 bytes).
const MAX_ID: usize = 255;

impl JobPattern {
    pub fn parse(text: &str) -> Result<Self, JobPatternError> {
        if text.contains('/') {
            return Err(JobPatternError::Slash(text.into()));
        }
        let mut parts = text.split("{id}");
        let before = parts.next().unwrap_or_default();
        let Some(after) = parts.next() else { return Err(JobPatternError::NoId(text.into())) };
        if parts.next().is_some() {
            return Err(JobPatternError::TwoIds(text.into()));
        }
        Ok(Self { text: text.into(), before: pieces(before), after: pieces(after) })
    }

    /// The pattern as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The job id in `name` if `name` matches (where a wildcard could take
    /// more or less, the id starts as early as it can); ids are never empty.
    pub fn job_id(&self, name: &str) -> Option<String> {
        // Every split of `name` into (head, id, tail) with head matching
        // `before` and tail `after`; names are short (<= 255 bytes).
        for start in (0..=name.len()).filter(|&i| name.is_char_boundary(i)) {
            if !matches(&self.before, &name[..start]) {
                continue;
            }
            for end in (start + 1..=name.len()).filter(|&i| name.is_char_boundary(i)) {
                if matches(&self.after, &name[end..]) {
                    let id = &name[start..end];
                    return (id.len() <= MAX_ID).then(|| id.to_string());
                }
            }
        }
        None
    }
}

fn pieces(text: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    for (i, lit) in text.split('*').enumerate() {
        if i > 0 {
            out.push(Piece::Any);
        }
        if !lit.is_empty() {
            out.push(Piece::Literal(lit.into()));
        }
    }
    out
}

/// Whether `text` matches the pieces whole.
fn matches(pieces: &[Piece], text: &str) -> bool {
    match pieces.split_first() {
        None => text.is_empty(),
        Some((Piece::Literal(lit), rest)) => {
            text.strip_prefix(lit.as_str()).is_some_and(|t| matches(rest, t))
        }
        Some((Piece::Any, rest)) => {
            (0..=text.len()).filter(|&i| text.is_char_boundary(i)).any(|i| matches(rest, &text[i..]))
        }
    }
}

/// `id` made safe for a file name: ASCII letters, digits, `.`, `_`, `-`
/// kept, anything else `_` (a delegated cgroup subtree lets users choose
/// names); never `.` or `..`.
pub fn file_safe(id: &str) -> String {
    let safe: String =
        id.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if safe.chars().all(|c| c == '.') { safe.replace('.', "_") } else { safe }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_and_systemd_names() {
        let slurm = JobPattern::parse("job_{id}").unwrap();
        assert_eq!(slurm.job_id("job_4242").as_deref(), Some("4242"));
        assert_eq!(slurm.job_id("job_"), None);
        assert_eq!(slurm.job_id("system"), None);
        assert_eq!(slurm.job_id("xjob_1"), None);
        let slice = JobPattern::parse("pyjob-{id}.slice").unwrap();
        assert_eq!(slice.job_id("pyjob-17.slice").as_deref(), Some("17"));
        assert_eq!(slice.job_id("pyjob-17.scope"), None);
        let any = JobPattern::parse("*-{id}.scope").unwrap();
        assert_eq!(any.job_id("run-u7-abc.scope").as_deref(), Some("u7-abc"));
        assert_eq!(JobPattern::parse("{id}").unwrap().job_id("x").as_deref(), Some("x"));
    }

    #[test]
    fn bad_patterns_say_what_to_write() {
        assert!(JobPattern::parse("job_*").unwrap_err().to_string().contains("job_{id}"));
        assert_eq!(JobPattern::parse("{id}{id}"), Err(JobPatternError::TwoIds("{id}{id}".into())));
        assert_eq!(JobPattern::parse("a/{id}"), Err(JobPatternError::Slash("a/{id}".into())));
    }

    #[test]
    fn ids_in_file_names() {
        assert_eq!(file_safe("42"), "42");
        assert_eq!(file_safe("../x y"), ".._x_y");
        assert_eq!(file_safe(".."), "__");
    }
}
