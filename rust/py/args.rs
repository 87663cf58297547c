//! The one integer-argument rule of the binding layer (memattr's Python
//! side has the same rule in `memattr._args`): exact ints take a fast path;
//! anything else with `__index__` (numpy integers included) is accepted;
//! `bool` and `numpy.bool_` are refused, since a flag passed where a number
//! belongs is a caller's bug. Errors name the argument: TypeError for a
//! non-integer, ValueError outside the type's range. Every binding (the VM,
//! the stores, the trackers, the page table) takes its integers here.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt};

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The argument as a Python int, or TypeError naming it.
fn as_index<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    if obj.is_instance_of::<PyBool>() || matches!(type_name(obj).as_str(), "bool" | "bool_") {
        return Err(PyTypeError::new_err(format!(
            "{name} must be an int, not bool"
        )));
    }
    obj.call_method0("__index__")
        .map_err(|_| PyTypeError::new_err(format!("{name} must be an int, not {}", type_name(obj))))
}

macro_rules! int_arg {
    ($fn:ident, $t:ty, $what:literal) => {
        #[doc = concat!("A `", stringify!($t), "` argument (see the module comment).")]
        pub(crate) fn $fn(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<$t> {
            if obj.is_exact_instance_of::<PyInt>() {
                if let Ok(v) = obj.extract::<$t>() {
                    return Ok(v);
                }
            }
            let i = as_index(obj, name)?;
            i.extract::<$t>().map_err(|_| {
                PyValueError::new_err(format!(
                    concat!("{0} must be ", $what, ", got {1}"),
                    name, i
                ))
            })
        }
    };
}

int_arg!(u64_arg, u64, "a u64 (0 <= {0} < 2**64)");
int_arg!(u32_arg, u32, "a u32 (0 <= {0} < 2**32)");
int_arg!(i64_arg, i64, "an s64");

/// A bool argument: exactly True or False.
pub(crate) fn bool_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    if obj.is_instance_of::<PyBool>() {
        return Ok(obj.is_truthy()?);
    }
    if matches!(type_name(obj).as_str(), "bool" | "bool_") {
        // numpy.bool_
        return Ok(obj.is_truthy()?);
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a bool, not {}",
        type_name(obj)
    )))
}
