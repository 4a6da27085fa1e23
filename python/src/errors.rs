//! Engine errors as Python exceptions: one class per [`ErrorKind`] (defined in
//! `ferry/errors.py`, each also a subclass of the matching built-in exception), the
//! message of the error, and its causes chained as `__cause__`.

use ferry_engine::ErrorKind;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// The exception class of `ferry.errors` for `kind`.
fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidInput => "InvalidInput",
        ErrorKind::Unsupported => "Unsupported",
        ErrorKind::Unreachable => "Unreachable",
        ErrorKind::Rejected => "Rejected",
        ErrorKind::TimedOut => "TimedOut",
        ErrorKind::Io => "IoError",
        _ => "Error",
    }
}

/// An instance of `ferry.errors.<class>` with `message`.
fn exception(py: Python<'_>, class: &str, message: String) -> PyErr {
    let made = py
        .import("ferry.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((message.clone(),)));
    match made {
        Ok(e) => PyErr::from_value(e),
        // The package's Python half is missing (the native module imported alone).
        Err(_) => PyRuntimeError::new_err(message),
    }
}

/// The Python exception for an engine error, with its causes chained.
pub(crate) fn to_py(py: Python<'_>, e: &ferry_engine::Error) -> PyErr {
    let top = exception(py, class_name(e.kind()), e.to_string());
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    // Chain from the innermost cause outwards.
    let mut chained: Option<PyErr> = None;
    for message in causes.into_iter().rev() {
        let cause = exception(py, "Error", message);
        cause.set_cause(py, chained.take());
        chained = Some(cause);
    }
    top.set_cause(py, chained);
    top
}

/// An `InvalidInput` (also a `ValueError`) with `message`.
pub(crate) fn invalid(message: impl Into<String>) -> PyErr {
    Python::attach(|py| exception(py, "InvalidInput", message.into()))
}

/// A `Rejected` (also a `RuntimeError`) with `message`.
pub(crate) fn rejected(message: impl Into<String>) -> PyErr {
    Python::attach(|py| exception(py, "Rejected", message.into()))
}

/// Converts engine results inside the binding.
pub(crate) trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, ferry_engine::Error> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(|e| Python::attach(|py| to_py(py, &e)))
    }
}
