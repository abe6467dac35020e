# syntax=docker/dockerfile:1
#
# sandq worker image.
#
#   docker build -t sandq:local .
#   docker compose up --build --scale worker=4
#
# ---------------------------------------------------------------------------
# Privileges the worker container needs, and why
# ---------------------------------------------------------------------------
# The worker is the sandbox *supervisor*: it builds a fresh jail for every job
# (namespaces, bind mounts, tmpfs, chroot, cgroup, a seccomp filter, then drops
# to a per-job uid) and only then execs the untrusted code. Building that jail
# needs a few privileges in the container; the jobs themselves end up with none.
#
# It therefore runs as root *inside* the container (no USER line below), with
# every capability dropped except:
#   CAP_SYS_ADMIN     unshare()/clone() of mount, pid, ipc, uts and net
#                     namespaces; mount(): bind mounts of the runtimes, tmpfs
#                     job dirs, remounting them read-only/nosuid/nodev; creating
#                     per-job cgroups and writing their limits.
#   CAP_SETUID,       drop each job to its own unprivileged uid/gid (and clear
#   CAP_SETGID        supplementary groups) before exec.
#   CAP_SYS_CHROOT    chroot()/pivot_root() into the job's root.
#   CAP_KILL          kill a job's whole process tree (it runs under another
#                     uid) on timeout, memory limit or shutdown.
#   CAP_CHOWN,        create job directories owned by the job's uid, and read,
#   CAP_FOWNER,       clean up and remove them afterwards although they belong
#   CAP_DAC_OVERRIDE  to another uid.
# Everything else (NET_RAW, MKNOD, SETFCAP, SETPCAP, NET_BIND_SERVICE, AUDIT_*,
# SYS_PTRACE, ...) is dropped: `cap_drop: [ALL]` + the list above.
#
# seccomp: Docker's default profile allows mount(), umount2(), unshare(),
# setns() and namespace flags on clone() only when CAP_SYS_ADMIN is granted,
# never allows pivot_root(), and other runtimes' defaults (containerd's
# RuntimeDefault, CRI-O, Podman) differ in detail. The worker container
# therefore runs with `seccomp=unconfined`. That is not "no seccomp for the
# code": the worker installs its own, much stricter, allow-list filter on
# every job process before it execs the untrusted program. (A custom profile,
# Docker's default plus pivot_root, is an alternative to unconfined.)
# AppArmor: the docker-default profile denies mount() whatever the
# capabilities, hence `apparmor=unconfined`.
#
# cgroup limits (memory, pids) need a writable cgroup hierarchy, which Docker
# mounts read-only by default: docker-compose.yml uses `cgroup: host` with
# /sys/fs/cgroup bind-mounted read-write; for Kubernetes see
# deploy/kubernetes/worker-deployment.yaml.
#
# Never run this image with --privileged: it is not needed and it would hand
# the jobs' supervisor every device and capability on the host.
# ---------------------------------------------------------------------------

FROM rust:1-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends libseccomp-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
# Only what the build needs (build.rs is optional; prescript/ is compiled in
# with include_str!): keeps target/ and the rest of the work tree out.
COPY Cargo.toml Cargo.lock build.rs* ./
COPY src ./src
COPY prescript ./prescript
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked \
 && install -m 0755 target/release/sandq /usr/local/bin/sandq

FROM node:20-bookworm-slim
# python3/python3-numpy and node are the job runtimes; libseccomp2 for the
# worker's per-job filter; redis-tools (redis-cli) for debugging from inside
# the container; tini as PID 1 so signals reach the worker and orphans are
# reaped.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-numpy libseccomp2 redis-tools ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /usr/local/bin/sandq /usr/local/bin/sandq
# The node image installs node under /usr/local; python3 is Debian's
# /usr/bin/python3 (the worker's default).
ENV SANDQ_NODE=/usr/local/bin/node
# Prometheus metrics, /healthz and /readyz.
EXPOSE 9464
# SIGTERM: the worker stops popping, lets running jobs finish within its
# shutdown grace period and requeues the rest.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "sandq"]
CMD ["worker"]
