//! The backend registry: which backends this build has, the typed [`Backend`] an
//! experiment's `backend:` key (and `--backend` / `--device`, which set it) is parsed into
//! once, and the executor each one builds. Everything that trains, evaluates or benchmarks
//! gets its executor from [`Backend::executor`].

use mdl_runtime::backend::Executor;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A backend of this build, as an experiment names it: `jit`, `interp`, `opencl` or
/// `opencl:N` (in a build with the `opencl` feature).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Backend {
    /// The fast CPU backend (Cranelift).
    #[default]
    Jit,
    /// The reference backend: every op by its eval rule.
    Interp,
    /// OpenCL on device N as `mdl devices` numbers them, or (`None`) the first GPU, else
    /// the first device.
    #[cfg(feature = "opencl")]
    OpenCl { device: Option<usize> },
}

impl Backend {
    /// The backends this build has, by name (`opencl` also as `opencl:N`).
    #[cfg(feature = "opencl")]
    pub const NAMES: &'static [&'static str] = &["jit", "interp", "opencl"];
    /// The backends this build has, by name.
    #[cfg(not(feature = "opencl"))]
    pub const NAMES: &'static [&'static str] = &["jit", "interp"];

    /// The executor that runs this backend's graphs (the jit on all the machine's cores).
    pub fn executor(self) -> Result<Box<dyn Executor>, String> {
        self.executor_on(None)
    }

    /// The executor, the jit on `threads` threads (default: the machine's cores); the
    /// other backends take no thread count.
    pub fn executor_on(self, threads: Option<usize>) -> Result<Box<dyn Executor>, String> {
        self.executor_with(threads, mdl_runtime::backend::jit::Products::F32)
    }

    /// [`Backend::executor_on`], the jit's matrix products computed as `products` says
    /// (the other backends compute them in their own precision).
    pub fn executor_with(
        self,
        threads: Option<usize>,
        products: mdl_runtime::backend::jit::Products,
    ) -> Result<Box<dyn Executor>, String> {
        use mdl_runtime::backend::jit::{default_threads, Jit};
        match self {
            Backend::Interp => Ok(Box::new(mdl_runtime::backend::Interp)),
            Backend::Jit => {
                Ok(Box::new(Jit::with_threads(threads.unwrap_or_else(default_threads)).with_products(products)))
            }
            #[cfg(feature = "opencl")]
            Backend::OpenCl { device } => {
                let exec = mdl_runtime::backend::opencl::OpenCl::new(device)?;
                let exec = match std::env::var(OPENCL_COMBINE_VAR).as_deref() {
                    Err(_) => exec,
                    Ok("device") => exec.with_sparse_rows_on_device(true),
                    Ok("host") => exec.with_sparse_rows_on_device(false),
                    Ok(other) => return Err(format!("{OPENCL_COMBINE_VAR}={other}: expected `device` or `host`")),
                };
                Ok(Box::new(exec))
            }
        }
    }
}

/// The error for `opencl` in a build without the feature.
pub const NO_OPENCL_FEATURE: &str =
    "this mdl was built without the `opencl` feature: cargo build --release --features opencl";

/// The environment variable that chooses where the OpenCL backend combines row-sparse
/// gradients: `device` (the default) or `host` (by the eval rule; the same sums).
pub const OPENCL_COMBINE_VAR: &str = "MDL_OPENCL_COMBINE";

impl FromStr for Backend {
    type Err = String;

    /// Parses a backend name against this build; the error names the choices.
    fn from_str(name: &str) -> Result<Backend, String> {
        let (base, device) = match name.split_once(':') {
            Some((b, d)) => (b, Some(d)),
            None => (name, None),
        };
        if base == "opencl" && !cfg!(feature = "opencl") {
            return Err(NO_OPENCL_FEATURE.into());
        }
        let device = match device {
            None => None,
            Some(d) => match (base, d.parse::<usize>()) {
                ("opencl", Ok(n)) => Some(n),
                _ => {
                    return Err(format!(
                        "backend `{name}`: only `opencl:N` takes a device number N (see `mdl devices`)"
                    ))
                }
            },
        };
        match (base, device) {
            ("jit", None) => Ok(Backend::Jit),
            ("interp", None) => Ok(Backend::Interp),
            #[cfg(feature = "opencl")]
            ("opencl", device) => Ok(Backend::OpenCl { device }),
            _ => Err(format!(
                "backend `{name}` is not available in this build (available: {})",
                Backend::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for Backend {
    /// The name [`Backend::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Jit => f.write_str("jit"),
            Backend::Interp => f.write_str("interp"),
            #[cfg(feature = "opencl")]
            Backend::OpenCl { device: None } => f.write_str("opencl"),
            #[cfg(feature = "opencl")]
            Backend::OpenCl { device: Some(n) } => write!(f, "opencl:{n}"),
        }
    }
}

impl TryFrom<String> for Backend {
    type Error = String;
    fn try_from(name: String) -> Result<Backend, String> {
        name.parse()
    }
}

impl From<Backend> for String {
    fn from(b: Backend) -> String {
        b.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back_as_written() {
        for name in Backend::NAMES {
            assert_eq!(name.parse::<Backend>().unwrap().to_string(), *name);
        }
        #[cfg(feature = "opencl")]
        assert_eq!("opencl:2".parse::<Backend>().unwrap(), Backend::OpenCl { device: Some(2) });
    }

    #[test]
    fn a_bad_name_is_refused_naming_the_choices() {
        let err = "tpu".parse::<Backend>().unwrap_err();
        assert_eq!(
            err,
            format!("backend `tpu` is not available in this build (available: {})", Backend::NAMES.join(", "))
        );
        let err = "jit:1".parse::<Backend>().unwrap_err();
        assert_eq!(err, "backend `jit:1`: only `opencl:N` takes a device number N (see `mdl devices`)");
        #[cfg(not(feature = "opencl"))]
        assert_eq!("opencl:0".parse::<Backend>().unwrap_err(), NO_OPENCL_FEATURE);
        #[cfg(feature = "opencl")]
        assert!("opencl:x".parse::<Backend>().unwrap_err().contains("only `opencl:N` takes a device number"));
    }

    #[test]
    fn an_experiment_names_it_as_a_string() {
        let b: Backend = serde_yaml::from_str("interp").unwrap();
        assert_eq!(b, Backend::Interp);
        assert_eq!(serde_yaml::to_string(&b).unwrap().trim(), "interp");
        let err = serde_yaml::from_str::<Backend>("tpu").unwrap_err().to_string();
        assert!(err.contains("backend `tpu` is not available"), "{err}");
    }
}
