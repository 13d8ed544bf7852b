//! How messages show a floating-point value the user gave: as Python's
//! `repr` does, the shortest text that reads back to the same number, in
//! positional form between 1e-4 and 1e16 and in exponent form outside
//! (`1e300`, not Rust's `{}` with its 301 digits).

use std::fmt;

/// `value` as a message shows it (see the module's text).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Num(pub f64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0.abs();
        match a != 0.0 && a.is_finite() && !(1e-4..1e16).contains(&a) {
            true => write!(f, "{:e}", self.0),
            false => write!(f, "{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Num;

    #[test]
    fn shows_the_shortest_text_that_reads_back() {
        for (v, want) in [
            (0.1, "0.1"),
            (-0.9, "-0.9"),
            (0.0, "0"),
            (1e-4, "0.0001"),
            (5e-5, "5e-5"),
            (1e300, "1e300"),
            (-1.5e200, "-1.5e200"),
            (1e15, "1000000000000000"),
            (1e16, "1e16"),
            (f64::INFINITY, "inf"),
            (f64::NAN, "NaN"),
        ] {
            assert_eq!(Num(v).to_string(), want);
        }
        for v in [1e-320, 3.3e-7, 123456.789, 1.7976931348623157e308] {
            assert_eq!(Num(v).to_string().parse::<f64>().unwrap(), v);
        }
    }
}
