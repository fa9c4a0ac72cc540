// The JS client (gateway/web/switchboard.js) with several URLs and GOAWAY REDIRECT, from Node
// (node --experimental-websocket). Prints one JSON object; tests/test_jsclient.py checks it.
//   node --experimental-websocket seeds.mjs CLIENT DEAD_URL LIVE_URL REDIRECTING_URL BOUNCING_URL TOKEN
import { pathToFileURL } from "node:url";

const [clientPath, dead, live, redirecting, bouncing, token] = process.argv.slice(2);
const { Client, MAX_REDIRECTS } = await import(pathToFileURL(clientPath).href);
const out = { maxRedirects: MAX_REDIRECTS };

async function run(name, opts, queue) {
  const c = new Client({ token, device: name, ...opts });
  const hops = [];
  c.addEventListener("status", (e) => { if (e.detail === "connecting") hops.push(c.url); });
  const queued = queue ? c.send("jsuser", `queued by ${name}`) : null;   // in the outbox before any connection
  await c.connect();
  const ack = await (queued ?? c.send("jsuser", `sent by ${name}`));
  out[name] = { url: c.url, hops, acked: typeof ack.id === "bigint" && ack.id > 0n };
  c.close();
}

// one try per seed without reconnect; with it, the same (the backoff waits for a full round)
await run("once", { urls: [dead, live], reconnect: false });
await run("again", { urls: [dead, dead, live] });
// a node that serves someone else: followed at once, as the same session (the queued SEND is stored there)
await run("redirected", { urls: [redirecting] }, true);
// two nodes that send the client to each other: the third REDIRECT is not followed; the next seed is
await run("bounced", { urls: [bouncing, live], reconnect: false });
// the single url of old still works
await run("single", { url: live, reconnect: false });
console.log(JSON.stringify(out));
