//! Kubernetes resource quantities (`100m`, `1.5Gi`, `2e3`).

/// A parsed quantity, held as thousandths of a unit (rounded up, as upstream's
/// `MilliValue`), which is exact for every quantity a request or a capacity uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity {
    milli: i128,
}

/// A string that is not a quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
)]
pub struct QuantityError;

impl Quantity {
    /// Parses upstream's quantity syntax.
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(QuantityError);
        }
        let (sign, rest) = match text.as_bytes()[0] {
            b'+' => (1i128, &text[1..]),
            b'-' => (-1i128, &text[1..]),
            _ => (1i128, text),
        };
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(number_len);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(QuantityError);
        }
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
        // Scale: value = digits * 10^exp10 * 2^exp2.
        let digits: String = format!("{int_part}{frac_part}");
        let mut exp10: i32 = -(frac_part.len() as i32);
        let mut exp2: u32 = 0;
        match suffix {
            "" => {}
            "Ki" => exp2 = 10,
            "Mi" => exp2 = 20,
            "Gi" => exp2 = 30,
            "Ti" => exp2 = 40,
            "Pi" => exp2 = 50,
            "Ei" => exp2 = 60,
            "n" => exp10 -= 9,
            "u" => exp10 -= 6,
            "m" => exp10 -= 3,
            "k" => exp10 += 3,
            "M" => exp10 += 6,
            "G" => exp10 += 9,
            "T" => exp10 += 12,
            "P" => exp10 += 15,
            "E" => exp10 += 18,
            s if s.starts_with(['e', 'E']) => {
                let exp: i32 = s[1..].parse().map_err(|_| QuantityError)?;
                if !(-30..=30).contains(&exp) {
                    return Err(QuantityError);
                }
                exp10 += exp;
            }
            _ => return Err(QuantityError),
        }
        let digits = digits.trim_start_matches('0');
        if digits.len() > 30 {
            return Err(QuantityError);
        }
        let mantissa: i128 = if digits.is_empty() {
            0
        } else {
            digits.parse().map_err(|_| QuantityError)?
        };
        // Milli-units: multiply by 1000 = 10^3.
        exp10 += 3;
        let mut value = mantissa.checked_mul(1i128 << exp2).ok_or(QuantityError)?;
        if exp10 >= 0 {
            value = value
                .checked_mul(10i128.checked_pow(exp10 as u32).ok_or(QuantityError)?)
                .ok_or(QuantityError)?;
        } else {
            let div = 10i128.checked_pow((-exp10) as u32).unwrap_or(i128::MAX);
            value = value / div + i128::from(value % div != 0);
        }
        Ok(Quantity {
            milli: sign * value,
        })
    }

    /// Thousandths of a unit (millicores for cpu).
    pub fn milli(&self) -> i128 {
        self.milli
    }

    /// Whole units, rounded up (bytes for memory).
    pub fn value(&self) -> i128 {
        let whole = self.milli / 1000;
        if self.milli % 1000 > 0 {
            whole + 1
        } else {
            whole
        }
    }

    /// A quantity from whole units.
    pub fn from_units(units: i128) -> Self {
        Quantity {
            milli: units * 1000,
        }
    }

    /// A quantity from thousandths.
    pub fn from_milli(milli: i128) -> Self {
        Quantity { milli }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_forms() {
        assert_eq!(Quantity::parse("100m").unwrap().milli(), 100);
        assert_eq!(Quantity::parse("1").unwrap().milli(), 1000);
        assert_eq!(Quantity::parse("1.5").unwrap().milli(), 1500);
        assert_eq!(Quantity::parse("1Ki").unwrap().value(), 1024);
        assert_eq!(Quantity::parse("1.5Gi").unwrap().value(), 1610612736);
        assert_eq!(Quantity::parse("2e3").unwrap().value(), 2000);
        assert_eq!(Quantity::parse("1n").unwrap().milli(), 1, "rounds up");
        assert_eq!(Quantity::parse("-1").unwrap().milli(), -1000);
        for bad in ["", "abc", "1.2.3", "1Xi", "m", "1e", "--1"] {
            assert!(Quantity::parse(bad).is_err(), "{bad}");
        }
    }
}
