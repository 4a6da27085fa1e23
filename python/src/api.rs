//! The Pythonic API: `ferry.Engine`, `Buffer`, `Segment`, `RemoteBuffer`, `BatchBuilder`,
//! `Batch`, `TaskStatus`. Thin handles over the engine's own (which are `Send + Sync`
//! and own what they need), so every Python thread may use them at once.
#![allow(unsafe_code)]

use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::{Access, BatchId, Engine, EngineConfig, Location, Progress};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use crate::errors::{invalid, IntoPy};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_class::<PyBuffer>()?;
    m.add_class::<PySegment>()?;
    m.add_class::<PyRemoteBuffer>()?;
    m.add_class::<PyBatchBuilder>()?;
    m.add_class::<PyBatch>()?;
    m.add_class::<PyTaskStatus>()?;
    Ok(())
}

pub(crate) fn parse_location(text: &str) -> PyResult<Location> {
    Location::parse(text).map_err(|e| invalid(e.to_string()))
}

pub(crate) fn parse_access(text: &str) -> PyResult<Access> {
    match text {
        "rw" | "read_write" | "RemoteReadWrite" => Ok(Access::RemoteReadWrite),
        "r" | "read" | "RemoteRead" => Ok(Access::RemoteRead),
        "local" | "Local" => Ok(Access::Local),
        other => Err(invalid(format!(
            "unknown access `{other}` (expected \"rw\", \"read\" or \"local\")"
        ))),
    }
}

fn access_name(a: Access) -> &'static str {
    match a {
        Access::RemoteReadWrite => "rw",
        Access::RemoteRead => "read",
        _ => "local",
    }
}

fn seconds(s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| invalid(format!("{s} is not a duration in seconds")))
}

/// An engine configuration from keyword settings over an optional base (a dict, or a
/// JSON string, in the shape of `EngineConfig`). Unknown settings are errors.
pub(crate) fn config_from(
    py: Python<'_>,
    base: Option<&Bound<'_, PyAny>>,
    settings: &Bound<'_, PyDict>,
) -> PyResult<EngineConfig> {
    let json = py.import("json")?;
    let merged = PyDict::new(py);
    if let Some(base) = base {
        let base = if let Ok(text) = base.extract::<String>() {
            json.call_method1("loads", (text,))?
        } else {
            base.clone()
        };
        merged.update(
            base.cast::<PyDict>()
                .map_err(|_| {
                    invalid("config must be a dict or a JSON string in the shape of EngineConfig")
                })?
                .as_mapping(),
        )?;
    }
    merged.update(settings.as_mapping())?;
    let text: String = json.call_method1("dumps", (merged,))?.extract()?;
    serde_json::from_str(&text).map_err(|e| invalid(format!("invalid engine configuration: {e}")))
}

/// A transfer engine: registered memory, peers' segments, batches of READ and WRITE.
///
/// `Engine(protocol="tcp", listen="127.0.0.1:0", metadata="p2p", config=None, **settings)`:
/// any field of the engine's configuration as a keyword (`timeout_ms=5000`,
/// `tcp={"lanes": 4}`), over `config` (a dict or JSON string of the same shape).
#[pyclass(module = "ferry", name = "Engine", frozen)]
pub(crate) struct PyEngine {
    pub(crate) inner: Arc<Engine>,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (protocol=None, listen=None, metadata=None, *, config=None, **settings))]
    fn new(
        py: Python<'_>,
        protocol: Option<String>,
        listen: Option<String>,
        metadata: Option<String>,
        config: Option<&Bound<'_, PyAny>>,
        settings: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let all = settings.cloned().unwrap_or_else(|| PyDict::new(py));
        for (key, value) in [
            ("protocol", protocol),
            ("listen", listen),
            ("metadata", metadata),
        ] {
            if let Some(v) = value {
                all.set_item(key, v)?;
            }
        }
        let config = config_from(py, config, &all)?;
        let engine = py.detach(|| Engine::from_config(&config)).py_err()?;
        Ok(PyEngine {
            inner: Arc::new(engine),
        })
    }

    /// This engine's segment name (`host:port` with peer-to-peer metadata).
    #[getter]
    fn name(&self) -> String {
        self.inner.name()
    }

    /// The transports it runs, best first.
    #[getter]
    fn protocols(&self) -> Vec<&'static str> {
        self.inner.protocols().iter().map(|p| p.name()).collect()
    }

    /// The TCP transport's counters: ``connections`` accepted, ``open_connections``,
    /// ``rejected_requests``, ``protocol_errors``, ``refused_connections``,
    /// ``auth_failures``, ``idle_timeouts``, ``progress_timeouts``,
    /// ``closed_on_deregister``, ``tracked_connections``, ``answers_read_by_waiters``.
    fn tcp_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.tcp_stats();
        counters(
            py,
            &[
                ("connections", s.connections),
                ("open_connections", s.open_connections),
                ("rejected_requests", s.rejected_requests),
                ("protocol_errors", s.protocol_errors),
                ("refused_connections", s.refused_connections),
                ("auth_failures", s.auth_failures),
                ("idle_timeouts", s.idle_timeouts),
                ("progress_timeouts", s.progress_timeouts),
                ("closed_on_deregister", s.closed_on_deregister),
                ("tracked_connections", s.tracked_connections),
                ("answers_read_by_waiters", s.answers_read_by_waiters),
            ],
        )
    }

    /// The batches' counters: ``late_wakeups`` (lost wake-ups: 0 unless something is
    /// broken), ``woken_late`` (waiters the machine ran late), ``early_wakes``,
    /// ``merged_requests``.
    fn batch_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.batch_stats();
        counters(
            py,
            &[
                ("late_wakeups", s.late_wakeups),
                ("woken_late", s.woken_late),
                ("early_wakes", s.early_wakes),
                ("merged_requests", s.merged_requests),
            ],
        )
    }

    /// What this engine's batches did with each peer it opened: a dict from the name it
    /// was opened by to that peer's counters (see ``Segment.stats``).
    fn peer_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (name, stats) in self.inner.peer_stats() {
            out.set_item(name, peer_stats_dict(py, &stats)?)?;
        }
        Ok(out)
    }

    /// Allocates `length` zeroed bytes at `location` ("cpu" or "cuda:N"), registered and
    /// published to peers with `access` ("rw", "read" or "local") under `name`.
    #[pyo3(signature = (length, location="cpu", access="rw", name=""))]
    fn allocate(
        &self,
        py: Python<'_>,
        length: usize,
        location: &str,
        access: &str,
        name: &str,
    ) -> PyResult<PyBuffer> {
        let (location, access) = (parse_location(location)?, parse_access(access)?);
        let name = name.to_string();
        let buf = py
            .detach(|| self.inner.allocate_with(length, location, access, &name))
            .py_err()?;
        Ok(PyBuffer::new(buf, None))
    }

    /// Registers caller memory: an object with the buffer protocol (writable and
    /// contiguous: a `bytearray`, a numpy array, an mmap), a tensor (`data_ptr()`), or an
    /// integer address with `length`. The object is kept alive (and a `bytearray` cannot
    /// be resized) while the returned buffer lives; a raw address is the caller's promise
    /// to keep `length` bytes valid until the buffer is dropped.
    #[pyo3(signature = (memory, length=None, location="auto", access="rw"))]
    fn register(
        &self,
        py: Python<'_>,
        memory: &Bound<'_, PyAny>,
        length: Option<usize>,
        location: &str,
        access: &str,
    ) -> PyResult<PyBuffer> {
        let access = parse_access(access)?;
        let mut location = parse_location(location)?;
        // Only a plain `int` is an address: a bool, a numpy scalar or a one-element tensor
        // also converts to an integer, and is not one.
        let is_int = memory.is_exact_instance_of::<pyo3::types::PyInt>();
        let (addr, len, keepalive) = if is_int {
            let addr: u64 = memory.extract()?;
            let len = length.ok_or_else(|| invalid("a raw address needs its length"))?;
            (addr, len, None)
        } else if memory.hasattr("data_ptr")? && memory.hasattr("element_size")? {
            let addr: u64 = memory.call_method0("data_ptr")?.extract()?;
            let len: usize = memory.call_method0("numel")?.extract::<usize>()?
                * memory.call_method0("element_size")?.extract::<usize>()?;
            if !memory.call_method0("is_contiguous")?.extract::<bool>()? {
                return Err(invalid("the tensor is not contiguous"));
            }
            // Where the tensor says it is decides; a different location is refused (a
            // device pointer taken as host memory would be dereferenced).
            let device = memory.getattr("device")?;
            let kind: String = device.getattr("type")?.extract()?;
            let actual = match kind.as_str() {
                "cuda" => Location::Cuda {
                    device: device
                        .getattr("index")?
                        .extract::<Option<u32>>()?
                        .unwrap_or(0),
                },
                "cpu" => Location::host(),
                other => {
                    return Err(invalid(format!(
                        "a tensor on `{other}` cannot be registered (cpu and cuda can)"
                    )))
                }
            };
            let same = match (location, actual) {
                (Location::Auto, _) => true,
                (Location::Host { .. }, Location::Host { .. }) => true,
                (a, b) => a == b,
            };
            if !same {
                return Err(invalid(format!(
                    "the tensor is on {actual}, not {location}"
                )));
            }
            if !matches!(location, Location::Host { .. }) {
                location = actual;
            }
            (
                addr,
                length.unwrap_or(len).min(len),
                Some(memory.clone().unbind()),
            )
        } else {
            let view = py
                .import("builtins")?
                .getattr("memoryview")?
                .call1((memory,))
                .map_err(|_| {
                    invalid("register takes an object with the buffer protocol, a tensor, or an integer address with a length")
                })?;
            if view.getattr("readonly")?.extract::<bool>()? {
                return Err(invalid(
                    "the object's buffer is read-only (bytes are immutable: register a bytearray or a numpy array)",
                ));
            }
            if !view.getattr("c_contiguous")?.extract::<bool>()? {
                return Err(invalid("the object's buffer is not contiguous"));
            }
            // What the buffer protocol exports is host memory.
            match location {
                Location::Auto => location = Location::host(),
                Location::Cuda { .. } => {
                    return Err(invalid(format!(
                        "an object with the buffer protocol is host memory, not {location}"
                    )))
                }
                Location::Host { .. } => {}
            }
            let nbytes: usize = view.getattr("nbytes")?.extract()?;
            if nbytes == 0 {
                return Err(invalid("the object's buffer is empty"));
            }
            let ctypes = py.import("ctypes")?;
            let array = ctypes
                .getattr("c_char")?
                .mul(nbytes)?
                .call_method1("from_buffer", (&view,))?;
            let addr: u64 = ctypes.call_method1("addressof", (array,))?.extract()?;
            (
                addr,
                length.unwrap_or(nbytes).min(nbytes),
                Some(view.unbind()),
            )
        };
        let engine = self.inner.clone();
        // SAFETY: the memory is kept valid by `keepalive` (an exported buffer or a
        // tensor) held by the returned buffer, or, for a raw address, by the caller's
        // documented promise; its location is checked by the engine where it can be.
        let buf = py
            .detach(move || unsafe { engine.register(addr as *mut u8, len, location, access) })
            .py_err()?;
        Ok(PyBuffer::new(buf, keepalive))
    }

    /// Opens a peer's segment by name (its `host:port` with peer-to-peer metadata), or
    /// this engine's own.
    fn open_segment(&self, py: Python<'_>, name: &str) -> PyResult<PySegment> {
        let name = name.to_string();
        let seg = py.detach(|| self.inner.open_segment(&name)).py_err()?;
        Ok(PySegment { inner: seg })
    }

    /// Starts a batch. Use it as a context manager (`with engine.batch(timeout=5) as b:`)
    /// to submit and wait on leaving the block, or call `submit()`.
    #[pyo3(signature = (timeout=None, retry_over_tcp=None))]
    fn batch(
        &self,
        timeout: Option<f64>,
        retry_over_tcp: Option<bool>,
    ) -> PyResult<PyBatchBuilder> {
        let mut b = self.inner.batch();
        if let Some(t) = timeout {
            b = b.timeout(seconds(t)?);
        }
        if let Some(r) = retry_over_tcp {
            b = b.retry_over_tcp(r);
        }
        Ok(PyBatchBuilder {
            inner: Mutex::new(Some(b)),
            submitted: Mutex::new(None),
            locals: Mutex::new(Vec::new()),
        })
    }

    /// Sends a small message to a segment's engine and waits until it is queued there.
    fn notify(&self, py: Python<'_>, segment: &PySegment, message: &[u8]) -> PyResult<()> {
        let message = message.to_vec();
        py.detach(|| self.inner.notify(&segment.inner, &message))
            .py_err()
    }

    /// The next notification as `(sender, message)`, waiting up to `timeout` seconds
    /// (`None`: do not wait); `None` when there is none.
    #[pyo3(signature = (timeout=None))]
    fn recv_notification<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let n = match timeout {
            Some(t) => {
                let t = seconds(t)?;
                py.detach(|| self.inner.recv_notification(t))
            }
            None => self.inner.try_recv_notification(),
        };
        n.map(|n| {
            PyTuple::new(
                py,
                [
                    n.from.into_pyobject(py)?.into_any(),
                    PyBytes::new(py, &n.message).into_any(),
                ],
            )
        })
        .transpose()
    }

    /// Stops the transports; transfers in flight fail, later calls raise.
    fn shutdown(&self, py: Python<'_>) {
        py.detach(|| self.inner.shutdown())
    }

    /// Progress of a batch by id (a dict, as `Batch.poll()`); raises `InvalidInput` for
    /// an id that names no live batch.
    fn batch_progress<'py>(&self, py: Python<'py>, id: u64) -> PyResult<Bound<'py, PyDict>> {
        let id = BatchId::from_u64(id).ok_or_else(|| invalid("0 is not a batch id"))?;
        let p = self.inner.batch_progress(id).py_err()?;
        progress_dict(py, p)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> bool {
        self.shutdown(py);
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "Engine(name={:?}, protocols={:?})",
            self.name(),
            self.protocols()
        )
    }
}

/// Registered memory. `len(buf)` bytes at `buf.addr`; `view()` is a zero-copy
/// `memoryview` and numpy sees it without a copy (`numpy.asarray(buf)`) for host
/// memory. Deregistered when the last reference goes.
#[pyclass(module = "ferry", name = "Buffer", frozen)]
pub(crate) struct PyBuffer {
    pub(crate) inner: ManuallyDrop<ferry_engine::Buffer>,
    /// What keeps caller memory valid (an exported buffer, a tensor): let go only after
    /// the buffer is deregistered and no transfer uses it.
    _keepalive: Option<Py<PyAny>>,
}

impl Drop for PyBuffer {
    fn drop(&mut self) {
        // SAFETY: taken once, here; `inner` is not used after.
        let inner = unsafe { ManuallyDrop::take(&mut self.inner) };
        // Deregistering waits for transfers still using the memory: without the GIL,
        // so the threads those transfers need keep running.
        Python::attach(|py| py.detach(move || drop(inner)));
    }
}

impl PyBuffer {
    pub(crate) fn new(inner: ferry_engine::Buffer, keepalive: Option<Py<PyAny>>) -> Self {
        PyBuffer {
            inner: ManuallyDrop::new(inner),
            _keepalive: keepalive,
        }
    }

    fn host(&self) -> PyResult<()> {
        if self.inner.location().is_host() {
            Ok(())
        } else {
            Err(invalid(format!(
                "{} memory has no host view: copy it with read()/write()",
                self.inner.location()
            )))
        }
    }
}

#[pymethods]
impl PyBuffer {
    /// Start address.
    #[getter]
    fn addr(&self) -> u64 {
        self.inner.addr()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Where the memory is: "cpu" or "cuda:N".
    #[getter]
    fn location(&self) -> String {
        self.inner.location().to_string()
    }

    /// What peers may do with it: "rw", "read" or "local".
    #[getter]
    fn access(&self) -> &'static str {
        access_name(self.inner.access())
    }

    /// The name peers look it up by.
    #[getter]
    fn name(&self) -> String {
        self.inner.descriptor().name.clone()
    }

    /// Copies `data` into the buffer at `offset`.
    #[pyo3(signature = (offset, data))]
    fn write(&self, py: Python<'_>, offset: usize, data: &[u8]) -> PyResult<()> {
        let data = data.to_vec();
        py.detach(|| self.inner.write_at(offset, &data)).py_err()
    }

    /// Copies `length` bytes at `offset` out of the buffer.
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: usize,
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = vec![0u8; length];
        py.detach(|| self.inner.read_at(offset, &mut out))
            .py_err()?;
        Ok(PyBytes::new(py, &out))
    }

    /// A writable `memoryview` of the buffer's bytes, without a copy (host memory). It
    /// keeps the buffer registered while it lives.
    fn view<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        this.host()?;
        let ctypes = py.import("ctypes")?;
        let array = ctypes
            .getattr("c_ubyte")?
            .mul(this.inner.len().max(1))?
            .call_method1("from_address", (this.inner.addr(),))?;
        // The array (and so every view of it) holds the buffer.
        array.setattr("_ferry_buffer", slf)?;
        // ctypes exports `<B`, which memoryview slices but cannot assign to: cast to `B`.
        let view = py
            .import("builtins")?
            .getattr("memoryview")?
            .call1((array,))?
            .call_method1("cast", ("B",))?;
        if this.inner.is_empty() {
            return view.get_item(pyo3::types::PySlice::new(py, 0, 0, 1));
        }
        Ok(view)
    }

    /// numpy's array interface: `numpy.asarray(buf)` shares the buffer's memory (and
    /// keeps the buffer alive).
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.host()?;
        let d = PyDict::new(py);
        d.set_item("shape", (self.inner.len(),))?;
        d.set_item("typestr", "|u1")?;
        d.set_item("data", (self.inner.addr(), false))?;
        d.set_item("version", 3)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "Buffer(addr={:#x}, len={}, location={}, access={})",
            self.inner.addr(),
            self.inner.len(),
            self.inner.location(),
            access_name(self.inner.access())
        )
    }
}

/// A peer's segment (or this engine's own).
#[pyclass(module = "ferry", name = "Segment", frozen)]
pub(crate) struct PySegment {
    pub(crate) inner: ferry_engine::Segment,
}

#[pymethods]
impl PySegment {
    /// The name it was opened by.
    #[getter]
    fn name(&self) -> String {
        self.inner.name().to_string()
    }

    /// The transport requests to it use; `None` for this engine's own segment.
    #[getter]
    fn protocol(&self) -> Option<&'static str> {
        self.inner.protocol().map(|p| p.name())
    }

    /// What the engine's batches did with this peer so far, across its re-openings:
    /// tasks ``completed``, ``failed`` and ``timed_out``, ``bytes_written`` and
    /// ``bytes_read`` by completed tasks, ``retried_over_tcp``, ``reopened``. Tasks
    /// count once their batch is dropped.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        peer_stats_dict(py, &self.inner.stats())
    }

    /// Whether this is the engine's own segment (requests are memory copies).
    #[getter]
    fn is_local(&self) -> bool {
        self.inner.is_local()
    }

    /// The buffers its owner published, in order.
    #[getter]
    fn buffers(&self) -> PyResult<Vec<PyRemoteBuffer>> {
        (0..self.inner.buffers().len())
            .map(|i| self.buffer(i))
            .collect()
    }

    /// The `index`-th published buffer.
    fn buffer(&self, index: usize) -> PyResult<PyRemoteBuffer> {
        let inner = self.inner.buffer(index).py_err()?;
        Ok(PyRemoteBuffer { inner })
    }

    /// The published buffer registered under `name`.
    fn buffer_named(&self, name: &str) -> PyResult<PyRemoteBuffer> {
        let inner = self.inner.buffer_named(name).py_err()?;
        Ok(PyRemoteBuffer { inner })
    }

    /// `(buffer, offset)` of the peer's address range `addr..addr+length`; `None` when no
    /// published buffer holds it.
    #[pyo3(signature = (addr, length=1))]
    fn locate(&self, addr: u64, length: u64) -> Option<(PyRemoteBuffer, u64)> {
        self.inner
            .locate(addr, length)
            .map(|(inner, offset)| (PyRemoteBuffer { inner }, offset))
    }

    fn __len__(&self) -> usize {
        self.inner.buffers().len()
    }

    fn __repr__(&self) -> String {
        format!(
            "Segment(name={:?}, protocol={}, buffers={})",
            self.inner.name(),
            self.protocol()
                .map_or("None".to_string(), |p| format!("{p:?}")),
            self.inner.buffers().len()
        )
    }
}

/// One buffer of a peer's segment.
#[pyclass(module = "ferry", name = "RemoteBuffer", frozen)]
pub(crate) struct PyRemoteBuffer {
    pub(crate) inner: ferry_engine::RemoteBuffer,
}

#[pymethods]
impl PyRemoteBuffer {
    /// Its address in the peer's memory.
    #[getter]
    fn addr(&self) -> u64 {
        self.inner.descriptor().addr
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// The name its owner gave it.
    #[getter]
    fn name(&self) -> String {
        self.inner.descriptor().name.clone()
    }

    /// Where it is on the peer: "cpu" or "cuda:N".
    #[getter]
    fn location(&self) -> String {
        self.inner.descriptor().location.to_string()
    }

    /// What the peer lets others do with it: "rw" or "read".
    #[getter]
    fn access(&self) -> &'static str {
        access_name(self.inner.descriptor().access)
    }

    fn __repr__(&self) -> String {
        let d = self.inner.descriptor();
        format!(
            "RemoteBuffer(addr={:#x}, len={}, location={}, name={:?})",
            d.addr, d.len, d.location, d.name
        )
    }
}

/// Where one task stands.
#[pyclass(module = "ferry", name = "TaskStatus", eq, eq_int, frozen)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum PyTaskStatus {
    /// Slices are still out.
    Pending,
    /// Every byte arrived (for a WRITE: acknowledged by the target).
    Completed,
    /// The task ended without completing (`Batch.reason(i)` says why).
    Failed,
    /// The batch's deadline passed first.
    TimedOut,
}

impl From<ferry_engine::TaskStatus> for PyTaskStatus {
    fn from(s: ferry_engine::TaskStatus) -> Self {
        match s {
            ferry_engine::TaskStatus::Pending => PyTaskStatus::Pending,
            ferry_engine::TaskStatus::Completed => PyTaskStatus::Completed,
            ferry_engine::TaskStatus::Failed(_) => PyTaskStatus::Failed,
            ferry_engine::TaskStatus::TimedOut => PyTaskStatus::TimedOut,
        }
    }
}

/// Requests collected for one batch. `write`/`read` add requests (checked at once),
/// `submit()` posts them; as a context manager it submits and waits when the block
/// ends, raising if a task did not complete (the batch is then in `.batch`).
#[pyclass(module = "ferry", name = "BatchBuilder", frozen)]
pub(crate) struct PyBatchBuilder {
    inner: Mutex<Option<ferry_engine::BatchBuilder>>,
    submitted: Mutex<Option<Py<PyBatch>>>,
    /// The local buffers of the requests, held until the batch is dropped: a buffer whose
    /// last Python reference goes while a request names it is deregistered only then
    /// (its drop would otherwise wait for this very batch).
    locals: Mutex<Vec<Py<PyBuffer>>>,
}

impl PyBatchBuilder {
    fn add(
        &self,
        write: bool,
        local: Bound<'_, PyBuffer>,
        local_offset: usize,
        remote: &PyRemoteBuffer,
        remote_offset: u64,
        length: usize,
    ) -> PyResult<()> {
        let mut guard = self.inner.lock();
        let b = guard
            .as_mut()
            .ok_or_else(|| invalid("the batch was already submitted"))?;
        let buf = &local.get().inner;
        let r = if write {
            b.write(buf, local_offset, &remote.inner, remote_offset, length)
        } else {
            b.read(buf, local_offset, &remote.inner, remote_offset, length)
        };
        r.map(|_| ()).py_err()?;
        self.locals.lock().push(local.unbind());
        Ok(())
    }
}

#[pymethods]
impl PyBatchBuilder {
    /// Adds a WRITE of `length` bytes from `local` at `local_offset` to `remote` at
    /// `remote_offset`.
    fn write(
        &self,
        local: Bound<'_, PyBuffer>,
        local_offset: usize,
        remote: PyRef<'_, PyRemoteBuffer>,
        remote_offset: u64,
        length: usize,
    ) -> PyResult<()> {
        self.add(true, local, local_offset, &remote, remote_offset, length)
    }

    /// Adds a READ of `length` bytes from `remote` at `remote_offset` into `local` at
    /// `local_offset`.
    fn read(
        &self,
        local: Bound<'_, PyBuffer>,
        local_offset: usize,
        remote: PyRef<'_, PyRemoteBuffer>,
        remote_offset: u64,
        length: usize,
    ) -> PyResult<()> {
        self.add(false, local, local_offset, &remote, remote_offset, length)
    }

    fn __len__(&self) -> usize {
        self.inner.lock().as_ref().map_or(0, |b| b.len())
    }

    /// Posts every request; the deadline starts now.
    fn submit(&self, py: Python<'_>) -> PyResult<PyBatch> {
        let b = self
            .inner
            .lock()
            .take()
            .ok_or_else(|| invalid("the batch was already submitted"))?;
        let batch = py.detach(|| b.submit()).py_err()?;
        Ok(PyBatch {
            inner: ManuallyDrop::new(batch),
            _locals: std::mem::take(&mut *self.locals.lock()),
        })
    }

    /// The batch submitted when the `with` block ended.
    #[getter]
    fn batch(&self, py: Python<'_>) -> Option<Py<PyBatch>> {
        self.submitted.lock().as_ref().map(|b| b.clone_ref(py))
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (exc_type, _exc, _tb))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        if !exc_type.is_none() {
            // The block raised: nothing is submitted.
            drop(self.inner.lock().take());
            return Ok(false);
        }
        let batch = Py::new(py, self.submit(py)?)?;
        *self.submitted.lock() = Some(batch.clone_ref(py));
        batch.get().wait(py, None)?;
        Ok(false)
    }
}

/// A submitted batch. Its tasks end by its deadline, each Completed, Failed or TimedOut.
#[pyclass(module = "ferry", name = "Batch", frozen)]
pub(crate) struct PyBatch {
    pub(crate) inner: ManuallyDrop<ferry_engine::Batch>,
    /// The local buffers its requests name, let go after the batch itself.
    _locals: Vec<Py<PyBuffer>>,
}

impl Drop for PyBatch {
    fn drop(&mut self) {
        // SAFETY: taken once, here; `inner` is not used after. The batch goes before the
        // buffers it names.
        drop(unsafe { ManuallyDrop::take(&mut self.inner) });
    }
}

fn progress_dict<'py>(py: Python<'py>, p: Progress) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("total", p.total)?;
    d.set_item("completed", p.completed)?;
    d.set_item("failed", p.failed)?;
    d.set_item("timed_out", p.timed_out)?;
    d.set_item("pending", p.pending)?;
    Ok(d)
}

#[pymethods]
impl PyBatch {
    /// The batch's id, a nonzero integer (`Engine.batch_progress` takes it).
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id().to_u64()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Waits until every task ended (or `timeout` seconds passed: then raises
    /// `TimedOut` with tasks still pending). Raises when a task failed or timed out.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        // Without a timeout the batch's own deadline ends every task.
        let limit = match timeout {
            Some(t) => seconds(t)?,
            None => Duration::from_secs(u32::MAX as u64),
        };
        py.detach(|| self.inner.wait(limit)).py_err()
    }

    /// Counts of the tasks by state, without waiting: a dict with `total`, `completed`,
    /// `failed`, `timed_out`, `pending`.
    fn poll<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        progress_dict(py, self.inner.poll())
    }

    /// Whether every task has ended.
    #[getter]
    fn done(&self) -> bool {
        self.inner.poll().is_done()
    }

    /// Every task's status, in the order the requests were added.
    fn statuses(&self) -> Vec<PyTaskStatus> {
        self.inner.statuses().into_iter().map(Into::into).collect()
    }

    /// Task `index`'s status.
    fn task(&self, index: usize) -> PyResult<PyTaskStatus> {
        self.inner
            .task(index)
            .map(Into::into)
            .ok_or_else(|| invalid(format!("the batch has {} tasks", self.inner.len())))
    }

    /// Why task `index` failed or timed out; `None` while it is pending or when it
    /// completed.
    fn reason(&self, index: usize) -> PyResult<Option<String>> {
        match self.inner.task(index) {
            Some(ferry_engine::TaskStatus::Failed(r)) => Ok(Some(r.to_string())),
            Some(ferry_engine::TaskStatus::TimedOut) => Ok(Some("timed out".into())),
            Some(_) => Ok(None),
            None => Err(invalid(format!("the batch has {} tasks", self.inner.len()))),
        }
    }

    fn __repr__(&self) -> String {
        let p = self.inner.poll();
        format!(
            "Batch(id={}, total={}, completed={}, failed={}, timed_out={}, pending={})",
            self.inner.id().to_u64(),
            p.total,
            p.completed,
            p.failed,
            p.timed_out,
            p.pending
        )
    }
}

/// Named counters as a dict.
fn counters<'py>(py: Python<'py>, pairs: &[(&str, u64)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for &(k, v) in pairs {
        d.set_item(k, v)?;
    }
    Ok(d)
}

/// A peer's counters as a dict.
fn peer_stats_dict<'py>(
    py: Python<'py>,
    s: &ferry_engine::PeerStats,
) -> PyResult<Bound<'py, PyDict>> {
    counters(
        py,
        &[
            ("completed", s.completed),
            ("failed", s.failed),
            ("timed_out", s.timed_out),
            ("bytes_written", s.bytes_written),
            ("bytes_read", s.bytes_read),
            ("retried_over_tcp", s.retried_over_tcp),
            ("reopened", s.reopened),
        ],
    )
}
