import asyncio


def test_two_clients_exchange_messages(gateway_proc):
    async def main():
        async with gateway_proc.client("alice") as alice, gateway_proc.client("bob") as bob:
            sent = await alice.send("bob", "hello bob")
            m = await bob.recv(timeout=5)
            assert (m.sender, m.text, m.id) == ("alice", "hello bob", sent.id)
            await bob.ack(m)
            back = await bob.send("alice", b"hi alice")
            m2 = await alice.recv(timeout=5)
            assert (m2.sender, m2.payload, m2.id) == ("bob", b"hi alice", back.id)
    asyncio.run(main())
