// Drives the web page's protocol client (gateway/web/switchboard.js) against a real gateway
// from Node (its WebSocket: node --experimental-websocket). Prints one JSON object of results;
// tests/test_jsclient.py starts the gateway, passes the tokens and checks the results.
//   node --experimental-websocket ids_and_groups.mjs CLIENT_URL WS_URL OWNER_TOKEN DEVICE MEMBER...
import { pathToFileURL } from "node:url";

const [clientPath, url, token, device, ...members] = process.argv.slice(2);
const { Client, idProblem } = await import(pathToFileURL(clientPath).href);
const out = {};

out.idProblems = ["", "a".repeat(255), "a".repeat(256), "\u20ac".repeat(85), "\u20ac".repeat(86)]
  .map((s) => idProblem(s) !== "");
try { new Client({ url, token, device: "d".repeat(256) }); out.longDevice = "accepted"; }
catch (err) { out.longDevice = err.constructor.name; }

const c = new Client({ url, token, device, reconnect: false });
const welcome = await c.connect();
out.welcome = { user: welcome.user, device: welcome.device, maxFrame: welcome.maxFrame };

// a request must fit in one frame: the client says so instead of sending it
try { c.group("create", "#js-too-big", { members }); out.tooBig = "sent"; }
catch (err) { out.tooBig = err.constructor.name; }

// members added a few at a time (each request fits in max_frame); the answers come in pieces
await c.group("create", "#js-group", { name: "\u00e9".repeat(127) + "x" });
let info;
for (let i = 0; i < members.length; i += 3) info = await c.group("add", "#js-group", { members: members.slice(i, i + 3) });
out.afterAdds = Object.keys(info.members).length;
info = await c.group("info", "#js-group");
out.info = info;

// following many long ids: SUBSCRIBE frames fit in max_frame, every user is answered
const seen = new Set();
const all = new Promise((resolve) => c.addEventListener("presence", (e) => {
  seen.add(e.detail.user);
  if (seen.size === members.length) resolve();
}));
c.subscribe(...members);
await Promise.race([all, new Promise((r) => setTimeout(r, 10000))]);
out.presences = seen.size;
out.connected = c.connected;
c.close();
console.log(JSON.stringify(out));
process.exit(0);
