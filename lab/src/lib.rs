//! The vdevlab harness, shared by the `vdevlab` command and the integration
//! tests: it provisions the lab ([`env`]), builds what a boot needs
//! ([`artifacts`]), boots guests under a real VMM with the real backend
//! ([`guest`]), runs scenarios ([`scenario`]), spots kernel splats
//! ([`splat`]) and records every run ([`record`]), in each cell of the
//! matrix ([`cell`]: VMM and accelerator); a run's sockets live in a short
//! private folder ([`sockets`]).

pub mod artifacts;
pub mod bench;
pub mod campaign;
pub mod cell;
pub mod doctor;
pub mod engine;
pub mod env;
pub mod guest;
pub mod project;
pub mod record;
pub mod report;
pub mod scenario;
pub mod sensor;
pub mod sockets;
pub mod splat;
pub mod up;

use std::sync::OnceLock;

use anyhow::Result;

/// A provisioned lab with its artifacts built.
#[derive(Debug, Clone)]
pub struct Lab {
    /// Toolchain, kernel and VMM.
    pub env: env::LabEnv,
    /// Backend, guest programs, driver and initramfs.
    pub artifacts: artifacts::Artifacts,
}

static LAB: OnceLock<Result<Lab, String>> = OnceLock::new();

impl Lab {
    /// Provision and build (once per process; cached across processes).
    pub fn get() -> Result<Lab> {
        LAB.get_or_init(|| {
            (|| -> Result<Lab> {
                let env = env::LabEnv::provision()?;
                let artifacts = artifacts::prepare(&env)?;
                Ok(Lab { env, artifacts })
            })()
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
    }
}
