import pytest

from media.host_guard import HostRefused, check_address, resolve_allowed


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.5.5.5", "::1",                   # loopback
        "10.1.2.3", "172.16.0.1", "192.168.1.1", "fd00::1",  # private
        "169.254.169.254", "fe80::1",                        # link-local (metadata server)
        "240.0.0.1",                                         # reserved
        "224.0.0.1", "ff02::1",                              # multicast
        "0.0.0.0", "::",                                     # unspecified
        "::ffff:10.0.0.1", "::ffff:127.0.0.1",               # IPv4-mapped internal
        "100.64.0.1",                                        # carrier-grade NAT, not global
    ],
)
def test_internal_addresses_are_refused(address):
    with pytest.raises(HostRefused):
        check_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "151.101.1.69", "2606:4700::1111"])
def test_public_addresses_pass(address):
    check_address(address)


def test_allow_loopback_opens_loopback_only():
    check_address("127.0.0.1", allow_loopback=True)
    check_address("::1", allow_loopback=True)
    for address in ("169.254.169.254", "10.0.0.1", "192.168.0.1", "0.0.0.0"):
        with pytest.raises(HostRefused):
            check_address(address, allow_loopback=True)


def test_names_are_checked_by_what_they_resolve_to():
    with pytest.raises(HostRefused, match="loopback"):
        resolve_allowed("localhost", 80)
    assert resolve_allowed("localhost", 80, allow_loopback=True) in ("127.0.0.1", "::1")
    with pytest.raises(HostRefused, match="link-local"):
        resolve_allowed("169.254.169.254", 80, allow_loopback=True)


def test_unresolvable_names_are_refused():
    with pytest.raises(HostRefused, match="cannot resolve"):
        resolve_allowed("no-such-host.invalid", 80)
