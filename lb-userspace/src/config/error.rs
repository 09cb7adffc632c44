//! What a refused config reports: every problem found, each as one
//! `FILE:LINE:COLUMN: message` line, sorted by position.

use std::fmt;

/// A position in the config file: 1-based line and column (in characters). Line 0 means
/// "no position" (the file could not be read); column 0 means "this line".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl Pos {
    pub const NONE: Pos = Pos { line: 0, column: 0 };

    pub const fn new(line: u32, column: u32) -> Self {
        Self { line, column }
    }
}

/// One thing wrong with a config, at a position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub pos: Pos,
    /// One line, no trailing period; user text in it is quoted and escaped.
    pub message: String,
}

impl Problem {
    pub fn new(pos: Pos, message: impl Into<String>) -> Self {
        Self {
            pos,
            message: message.into(),
        }
    }
}

/// Why a config was refused: one or more [`Problem`]s in the file `origin`.
///
/// Its `Display` is one `origin:line:column: message` line per problem, sorted by
/// position, ready for a terminal or a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    origin: String,
    problems: Vec<Problem>,
}

impl ConfigError {
    /// Sorts `problems` by position (stable, so problems at one position keep the order in
    /// which they were found) and drops exact repeats.
    pub(crate) fn new(origin: &str, mut problems: Vec<Problem>) -> Self {
        problems.sort_by_key(|p| p.pos);
        problems.dedup();
        Self {
            origin: origin.to_owned(),
            problems,
        }
    }

    /// The file name the positions refer to.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The problems, sorted by position.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The problems as `origin:line:column: message` lines.
    pub fn lines(&self) -> Vec<String> {
        self.problems.iter().map(|p| self.line(p)).collect()
    }

    fn line(&self, problem: &Problem) -> String {
        let Problem { pos, message } = problem;
        let origin = &self.origin;
        match (pos.line, pos.column) {
            (0, _) => format!("{origin}: {message}"),
            (line, 0) => format!("{origin}:{line}: {message}"),
            (line, column) => format!("{origin}:{line}:{column}: {message}"),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&self.line(problem))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// `text` in double quotes with control characters, quotes and backslashes escaped, cut
/// to a readable length: user text inside a one-line message.
pub(crate) fn quote(text: &str) -> String {
    const MAX_CHARS: usize = 60;
    let mut quoted = String::with_capacity(text.len().min(MAX_CHARS) + 2);
    quoted.push('"');
    for (i, c) in text.chars().enumerate() {
        if i == MAX_CHARS {
            quoted.push('…');
            break;
        }
        quoted.extend(c.escape_debug());
    }
    quoted.push('"');
    quoted
}

/// The candidate closest to `wrong` by edit distance, if it is close enough to be a
/// likely typo.
pub(crate) fn suggest<'a>(
    wrong: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let wrong_lower = wrong.to_lowercase();
    let limit = match wrong.chars().count() {
        0..=3 => 1,
        4..=6 => 2,
        _ => 3,
    };
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&wrong_lower, &c.to_lowercase()),
                c,
            )
        })
        .filter(|&(distance, _)| distance <= limit)
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_print_sorted_one_per_line() {
        let error = ConfigError::new(
            "lb.yaml",
            vec![
                Problem::new(Pos::new(9, 3), "b"),
                Problem::new(Pos::new(2, 7), "a"),
                Problem::new(Pos::new(9, 0), "c"),
                Problem::new(Pos::NONE, "d"),
            ],
        );
        assert_eq!(
            error.to_string(),
            "lb.yaml: d\nlb.yaml:2:7: a\nlb.yaml:9: c\nlb.yaml:9:3: b"
        );
    }

    #[test]
    fn quote_escapes_and_cuts() {
        assert_eq!(quote("a\"b\nc"), r#""a\"b\nc""#);
        assert_eq!(quote(&"x".repeat(100)), format!("\"{}…\"", "x".repeat(60)));
    }

    #[test]
    fn suggest_finds_typos_only() {
        let keys = ["address", "weight", "name"];
        assert_eq!(suggest("adress", keys), Some("address"));
        assert_eq!(suggest("Wieght", keys), Some("weight"));
        assert_eq!(suggest("colour", keys), None);
    }
}
