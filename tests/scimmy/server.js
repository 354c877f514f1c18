// A second SCIM 2.0 server for scim-connect's integration tests, built on scimmy and
// scimmy-routers: in-memory Users and Groups, bearer auth, served at /scim/v2 on 127.0.0.1 only.
//
// Usage: SCIMMY_TOKEN=<token> node server.js <port>
// The token comes from the environment so that it never shows in a process listing. The server
// prints `listening on <port>` once it accepts connections and keeps nothing when it stops.
import { randomUUID, timingSafeEqual } from "node:crypto";
import express from "express";
import SCIMMY from "scimmy";
import SCIMMYRouters from "scimmy-routers";

const port = Number.parseInt(process.argv[2] ?? "", 10);
const token = process.env.SCIMMY_TOKEN ?? "";
if (!Number.isInteger(port) || port <= 0 || port > 65535 || !token) {
    console.error("usage: SCIMMY_TOKEN=<token> node server.js <port 1-65535>");
    process.exit(2);
}

// One store per resource type. `unique` names the attribute that must be unique
// (case-insensitively, as RFC 7643 defines userName), so a duplicate create gets 409.
function store(Resource, unique) {
    const items = new Map();
    const clash = (value, id) => [...items.values()].some(
        (item) => item.id !== id && String(item[unique]).toLowerCase() === String(value).toLowerCase());
    const find = (id) => {
        const found = items.get(id);
        if (!found) throw new SCIMMY.Types.Error(404, null, `Resource ${id} not found`);
        return found;
    };
    SCIMMY.Resources.declare(Resource)
        .ingress((resource, instance) => {
            if (clash(instance[unique], resource.id)) {
                throw new SCIMMY.Types.Error(409, "uniqueness", `${unique} ${instance[unique]} is taken`);
            }
            const now = new Date().toISOString();
            const previous = resource.id ? find(resource.id) : undefined;
            // A plain copy: scimmy's schema instances carry getters and their own `meta`.
            const { schemas, meta, ...attributes } = JSON.parse(JSON.stringify(instance));
            const stored = {
                ...attributes,
                id: previous?.id ?? randomUUID(),
                meta: { created: previous?.meta.created ?? now, lastModified: now },
            };
            items.set(stored.id, stored);
            return stored;
        })
        .egress((resource) => {
            if (resource.id) return find(resource.id);
            const all = [...items.values()];
            return resource.filter ? resource.filter.match(all) : all;
        })
        .degress((resource) => {
            find(resource.id);
            items.delete(resource.id);
        });
}
store(SCIMMY.Resources.User, "userName");
store(SCIMMY.Resources.Group, "displayName");

const expected = Buffer.from(`Bearer ${token}`);
const app = express();
// One line per request, for the test's failure output (the test data holds no secrets).
app.use((request, response, next) => {
    response.on("finish", () => console.log(`${request.method} ${request.originalUrl} ${response.statusCode}`));
    next();
});
app.use("/scim/v2", new SCIMMYRouters({
    type: "bearer",
    handler: (request) => {
        const presented = Buffer.from(request.header("Authorization") ?? "");
        if (presented.length !== expected.length || !timingSafeEqual(presented, expected)) {
            throw new Error("missing or wrong bearer token");
        }
        return "scim-connect-tests";
    },
}));

const server = app.listen(port, "127.0.0.1", () => console.log(`listening on ${port}`));
server.on("error", (e) => {
    console.error(`cannot listen on 127.0.0.1:${port}: ${e.message}`);
    process.exit(1);
});
for (const signal of ["SIGTERM", "SIGINT"]) {
    // Nothing to flush: the state is meant to vanish, and open keep-alive connections must not
    // hold the exit up.
    process.on(signal, () => process.exit(0));
}
