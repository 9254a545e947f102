from microagent.registry import RegistryClient
from microagent.credentials import Credentials
from tests.support.push import push_layout

def test_smoke(registry, auth_registry, token_registry, small_layout):
    for r in (registry, auth_registry, token_registry):
        d = push_layout(r.host, "x/small", "latest", small_layout, credentials=r.credentials)
        creds = Credentials(*r.credentials) if r.credentials else None
        with RegistryClient(r.host, plain_http=True, credentials=creds) as c:
            m = c.get_manifest("x/small", "latest")
            print(r.host, m.media_type, m.digest, d)
            assert m.digest == d
