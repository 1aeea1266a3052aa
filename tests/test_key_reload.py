"""Key rotation the way Kubernetes does it (atomic `..data` symlink swap) and by a
plain file replace, during live sessions."""

import asyncio
import json
import os
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import Keys, SidecarProcess, http_get, run


class SecretVolume:
    """A directory laid out like a mounted Secret: keys.json -> ..data/keys.json."""

    def __init__(self, root):
        self.root = root
        self.n = 0

    def publish(self, content: str):
        self.n += 1
        version = os.path.join(self.root, f"..2026_11_28_{self.n}")
        os.mkdir(version)
        with open(os.path.join(version, "keys.json"), "w") as f:
            f.write(content)
        tmp = os.path.join(self.root, "..data_tmp")
        os.symlink(os.path.basename(version), tmp)
        os.rename(tmp, os.path.join(self.root, "..data"))      # the atomic swap
        link = os.path.join(self.root, "keys.json")
        if not os.path.islink(link):
            os.symlink("..data/keys.json", link)


def keyfile(keys: Keys, ids) -> str:
    return json.dumps({"keys": [e for e in keys.entries if e["id"] in ids]})


async def opens(sidecar, key) -> bool:
    try:
        async with connect(sidecar.url(), additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            return "session.created" in await ws.recv()
    except ConnectionClosed:
        return False


async def eventually(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


def test_symlink_swap_rotation(tmp_path, mock_provider):
    keys = Keys()
    alpha, beta = keys.add("alpha"), keys.add("beta")
    volume = SecretVolume(str(tmp_path / "secret"))
    os.mkdir(volume.root)
    volume.publish(keyfile(keys, {"alpha"}))
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), keys,
                             keys_file=os.path.join(volume.root, "keys.json")).start()
    try:
        async def body():
            live = await connect(sidecar.url(), additional_headers={"Authorization": f"Bearer {alpha}"})
            assert "session.created" in await live.recv()
            assert not await opens(sidecar, beta)

            volume.publish(keyfile(keys, {"alpha", "beta"}))        # rotate in a new key
            assert await eventually(lambda: opens(sidecar, beta))

            volume.publish("{not json")                             # a broken update
            await asyncio.sleep(0.6)                                # three poll intervals
            assert await opens(sidecar, alpha) and await opens(sidecar, beta)
            await live.send(b"still here")
            assert await live.recv() == b"still here"

            volume.publish(keyfile(keys, {"beta"}))                 # revoke alpha
            try:
                await asyncio.wait_for(live.recv(), 3)
                raise AssertionError("the session of a removed key stayed open")
            except ConnectionClosed as exc:
                assert (exc.rcvd.code, exc.rcvd.reason) == (4001, "key revoked")
            assert not await opens(sidecar, alpha)
            assert await opens(sidecar, beta)
        run(body())
        metrics = http_get(sidecar.admin("/metrics"))[1]
        assert 'conduit_keys_reload_total{result="invalid"} 1.0' in metrics
        assert 'conduit_keys_reload_total{result="ok"} 2.0' in metrics
    finally:
        sidecar.stop()


def test_plain_file_replace_and_disable(tmp_path, mock_provider):
    keys = Keys()
    alpha = keys.add("alpha")
    sidecar = SidecarProcess(str(tmp_path), mock_provider.section(), keys).start()
    try:
        async def body():
            live = await connect(sidecar.url(), additional_headers={"Authorization": f"Bearer {alpha}"})
            await live.recv()
            keys.entries[0]["enabled"] = False
            keys.write(sidecar.keys_file)                           # os.replace
            try:
                await asyncio.wait_for(live.recv(), 3)
                raise AssertionError("the session of a disabled key stayed open")
            except ConnectionClosed as exc:
                assert (exc.rcvd.code, exc.rcvd.reason) == (4001, "key disabled")
        run(body())
    finally:
        sidecar.stop()
