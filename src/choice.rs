//! Closed sets of named values that a user picks from (precision, head,
//! optimizer, LR schedule, export format): each enum lists its names with
//! one line of help, and `cmd` turns that list into command-line values.
//! The library itself knows no command-line parser.

use anyhow::{Result, bail};

pub trait Choice: Copy + PartialEq + Send + Sync + 'static {
    /// Every value, in the order help lists them.
    const ALL: &'static [Self];
    /// The name a user types and files record.
    fn name(self) -> &'static str;
    /// One line for `--help`.
    fn help(self) -> &'static str;
    /// Other names it is known by (PyTorch's, where they differ), taken
    /// as the name but never shown or recorded.
    fn aliases(self) -> &'static [&'static str] {
        &[]
    }
    /// Names other tools give to one of these values with an option of its
    /// own (torchvision's `sgd_nesterov`), each with vggctl's form of it:
    /// refused, naming that form.
    fn other_forms() -> &'static [(&'static str, &'static str)] {
        &[]
    }
}

/// The value of `T` named `s`; `what` names the set in the error.
pub fn parse<T: Choice>(what: &str, s: &str) -> Result<T> {
    if let Some(v) = T::ALL
        .iter()
        .find(|v| v.name() == s || v.aliases().contains(&s))
    {
        return Ok(*v);
    }
    if let Some((_, form)) = T::other_forms().iter().find(|(name, _)| *name == s) {
        bail!("that is {form} in vggctl");
    }
    bail!(
        "unknown {what} '{s}' (expected {})",
        names_where::<T>(|_| true)
    )
}

/// Names for a message: `a`, `a or b`, `a, b or c`.
pub fn either<S: AsRef<str>>(names: &[S]) -> String {
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Option ids (a flag's name without `--`, `_` for `-`) and the values of
/// `T` that take them: a row of a table saying which options each
/// optimizer or schedule has a use for.
pub type Takers<T> = (&'static [&'static str], fn(T) -> bool);

/// The names of the values of `T` that `keep` keeps, in help's order.
pub fn names_of<T: Choice>(keep: impl Fn(T) -> bool) -> Vec<&'static str> {
    T::ALL
        .iter()
        .filter(|v| keep(**v))
        .map(|v| v.name())
        .collect()
}

/// [`names_of`] as [`either`] writes them.
pub fn names_where<T: Choice>(keep: impl Fn(T) -> bool) -> String {
    either(&names_of(keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Colour {
        Red,
        Green,
        Blue,
    }

    impl Choice for Colour {
        const ALL: &'static [Self] = &[Colour::Red, Colour::Green, Colour::Blue];
        fn name(self) -> &'static str {
            match self {
                Colour::Red => "red",
                Colour::Green => "green",
                Colour::Blue => "blue",
            }
        }
        fn help(self) -> &'static str {
            ""
        }
        fn other_forms() -> &'static [(&'static str, &'static str)] {
            &[("crimson", "red --dark")]
        }
    }

    #[test]
    fn parses_names_and_lists_them_when_unknown() {
        assert_eq!(parse::<Colour>("colour", "green").unwrap(), Colour::Green);
        let err = parse::<Colour>("colour", "Green").unwrap_err().to_string();
        assert_eq!(err, "unknown colour 'Green' (expected red, green or blue)");
        let err = parse::<Colour>("colour", "crimson")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "that is red --dark in vggctl");
    }

    #[test]
    fn names_are_listed_with_or_before_the_last() {
        assert_eq!(either::<&str>(&[]), "");
        assert_eq!(either(&["a"]), "a");
        assert_eq!(either(&["a", "b"]), "a or b");
        assert_eq!(either(&["a", "b", "c"]), "a, b or c");
        assert_eq!(names_where::<Colour>(|c| c != Colour::Green), "red or blue");
    }
}
