//! Several in-process media servers wired into one mesh, as the operator would wire them: one
//! mesh plan, one CA with a certificate per server (made by the operator's own code), one join key.
//! Servers can be killed and restarted on the same addresses, and a server's advertised mesh
//! address can point at a test proxy (lossy or cut links).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use chorus_crds::{MeshMixing, MeshNode, MeshPlan, MeshTransfer};
use chorus_mediaserver::config::Config;
use chorus_operator::plan::ServerCert;
use chorus_operator::secret_material::{MeshCa, new_mesh_ca};

use crate::media_server::{MediaServer, random_key};

/// One server's fixed addresses and files.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Server id.
    pub id: String,
    /// Region.
    pub region: String,
    /// Where it binds its mesh endpoint.
    pub mesh_bind: SocketAddr,
}

/// The files the operator would give a mesh: one CA, a certificate per server, one plan. Servers
/// (or bare mesh nodes) are started from them.
#[derive(Debug)]
pub struct MeshFiles {
    /// The directory holding `ca.crt`, each server's certificate and key, and `mesh.json`.
    pub dir: PathBuf,
    /// One slot per server, in plan order.
    pub slots: Vec<Slot>,
    /// The plan written to `mesh.json`.
    pub plan: MeshPlan,
}

impl MeshFiles {
    /// Certificates and a plan for one server per region name, mixing `top_speakers` of the
    /// CRD's defaults otherwise. `advertise(i, bind)` gives the mesh address the plan lists for
    /// server i.
    pub fn create(
        regions: &[&str],
        top_speakers: usize,
        advertise: impl Fn(usize, SocketAddr) -> SocketAddr,
    ) -> Result<Self> {
        let dir = crate::unique_temp_dir("mesh")?;
        let ca_data = new_mesh_ca("e2e").map_err(|e| anyhow::anyhow!("{e}"))?;
        let ca = MeshCa::from_secret_data(&ca_data).map_err(|e| anyhow::anyhow!("{e}"))?;
        std::fs::write(dir.join("ca.crt"), &ca_data["ca.crt"].0)?;
        let mut slots = Vec::new();
        let mut nodes = Vec::new();
        for (i, region) in regions.iter().enumerate() {
            let id = format!("e2e-{region}-0");
            let mesh_bind = crate::free_udp_addr()?;
            let files = ca
                .issue(&ServerCert {
                    id: id.clone(),
                    dns_names: vec![id.clone()],
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for (name, bytes) in files {
                std::fs::write(dir.join(name), &bytes.0)?;
            }
            nodes.push(MeshNode {
                id: id.clone(),
                region: (*region).to_owned(),
                mesh: advertise(i, mesh_bind).to_string(),
                signal: String::new(),
            });
            slots.push(Slot {
                id,
                region: (*region).to_owned(),
                mesh_bind,
            });
        }
        let plan = MeshPlan {
            conference: "e2e".into(),
            generation: 1,
            nodes,
            mixing: MeshMixing {
                top_speakers: u32::try_from(top_speakers)?,
                jitter_min_ms: 2,
                ..MeshMixing::default()
            },
            transfer: MeshTransfer {
                enabled: true,
                token_ttl_seconds: 60,
                allow_cross_server: true,
            },
            telephony: None,
        };
        std::fs::write(dir.join("mesh.json"), plan.to_json())?;
        Ok(Self { dir, slots, plan })
    }
}

impl Drop for MeshFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Extra configuration of server i (its SIP socket and credentials, say).
pub type ConfigureServer = std::sync::Arc<dyn Fn(usize, &mut Config) + Send + Sync>;

/// A running mesh of servers.
pub struct MeshCluster {
    /// The servers, `None` while killed.
    pub servers: Vec<Option<MediaServer>>,
    /// Their slots.
    pub slots: Vec<Slot>,
    /// The plan every server runs.
    pub plan: MeshPlan,
    key: Vec<u8>,
    files: MeshFiles,
    configure: Option<ConfigureServer>,
}

impl std::fmt::Debug for MeshCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCluster")
            .field("slots", &self.slots)
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

impl MeshCluster {
    /// Start one server per region name. `advertise(i, bind)` gives the mesh address the PLAN lists
    /// for server i (a proxy in front of it, say); by default its bind address. The servers take
    /// their mixing settings from the plan only (`top_speakers` there), as in a cluster.
    pub async fn start(
        regions: &[&str],
        top_speakers: usize,
        advertise: impl Fn(usize, SocketAddr) -> SocketAddr,
    ) -> Result<Self> {
        Self::start_configured(regions, top_speakers, advertise, |_| {}, None).await
    }

    /// Like [`MeshCluster::start`], with the first plan changed by `change_plan` (a `telephony`
    /// block, say) and each server's configuration by `configure`.
    pub async fn start_configured(
        regions: &[&str],
        top_speakers: usize,
        advertise: impl Fn(usize, SocketAddr) -> SocketAddr,
        change_plan: impl FnOnce(&mut MeshPlan),
        configure: Option<ConfigureServer>,
    ) -> Result<Self> {
        let mut files = MeshFiles::create(regions, top_speakers, advertise)?;
        change_plan(&mut files.plan);
        std::fs::write(files.dir.join("mesh.json"), files.plan.to_json())?;
        let mut cluster = Self {
            servers: Vec::new(),
            slots: files.slots.clone(),
            plan: files.plan.clone(),
            key: random_key(),
            files,
            configure,
        };
        for i in 0..regions.len() {
            let server = cluster.launch(i).await?;
            cluster.servers.push(Some(server));
        }
        Ok(cluster)
    }

    /// Write a new plan generation with `change` applied, as the operator would; every server
    /// applies it live.
    pub fn update_plan(&mut self, change: impl FnOnce(&mut MeshPlan)) -> Result<()> {
        change(&mut self.plan);
        self.plan.generation += 1;
        let tmp = self.files.dir.join("mesh.json.tmp");
        std::fs::write(&tmp, self.plan.to_json())?;
        std::fs::rename(&tmp, self.plan_path())?;
        Ok(())
    }

    async fn launch(&self, i: usize) -> Result<MediaServer> {
        let slot = self.slots[i].clone();
        let dir = self.files.dir.clone();
        let configure = self.configure.clone();
        MediaServer::start_with_key(&self.key, move |c| {
            c.server_id = slot.id.clone();
            c.region = slot.region.clone();
            c.mesh = Some(chorus_mediaserver::config::MeshSource::File(
                dir.join("mesh.json"),
            ));
            c.mesh_addr = slot.mesh_bind;
            c.mesh_tls_dir = dir.clone();
            if let Some(configure) = &configure {
                configure(i, c);
            }
        })
        .await
        .with_context(|| format!("starting {}", self.slots[i].id))
    }

    /// The plan file every server watches (write a new generation to apply it live).
    pub fn plan_path(&self) -> PathBuf {
        self.files.dir.join("mesh.json")
    }

    /// Server `i`.
    pub fn server(&self, i: usize) -> &MediaServer {
        self.servers[i].as_ref().expect("server is running")
    }

    /// Stop server `i` (its sockets close; peers see it die).
    pub fn kill(&mut self, i: usize) {
        self.servers[i] = None;
    }

    /// Start server `i` again on the same addresses.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        let server = self.launch(i).await?;
        self.servers[i] = Some(server);
        Ok(())
    }

    /// The index of the primary of `room` while every server is alive.
    pub fn primary_of(&self, room: &str) -> usize {
        let ids: Vec<String> = self.slots.iter().map(|s| s.id.clone()).collect();
        let first = chorus_mediaserver::mesh::protocol::rendezvous_order(room, &ids)
            .into_iter()
            .next()
            .unwrap_or_default();
        self.slots.iter().position(|s| s.id == first).unwrap_or(0)
    }
}
