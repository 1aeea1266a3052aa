"""nginx as a tuned WebSocket reverse proxy: finding (or installing) Debian's nginx,
and its config. One worker, no buffering, no access log; everything in one temp dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess

INSTALL = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_nginx_install.sh")


def find_or_install() -> tuple[str | None, str]:
    """(path to nginx, or None and why not). Installs Debian's package only as root
    with apt available, as CI does."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "nginx not installed (and not root with apt-get to install it)"
    done = subprocess.run(["bash", INSTALL], capture_output=True, text=True, check=False)
    found = shutil.which("nginx", path="/usr/sbin:/usr/bin")
    if not found:
        return None, f"nginx install failed: {done.stderr.strip()[-500:]}"
    return found, ""


def config(workdir: str, port: int, upstream_port: int, ca_file: str | None) -> str:
    """Write nginx.conf into `workdir`; `ca_file` set means a TLS upstream, verified."""
    scheme = "https" if ca_file else "http"
    tls = f"""
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca_file};
            proxy_ssl_name localhost;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;""" if ca_file else ""
    text = f"""\
worker_processes 1;
worker_rlimit_nofile 20000;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp;
    proxy_temp_path {workdir}/tmp;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass {scheme}://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 128k;
            tcp_nodelay on;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;{tls}
        }}
    }}
}}
"""
    path = os.path.join(workdir, "nginx.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


def argv(nginx: str, workdir: str) -> list[str]:
    # -e: the error log from the very start, before nginx.conf is read.
    return [nginx, "-p", workdir, "-c", "nginx.conf", "-e", f"{workdir}/error.log",
            "-g", "daemon off;"]
