// The service worker of the installable web app: on install it caches the app's own files (the list and its
// version are written above by build.mjs), and serves them cache-first, so the page opens offline once it has been
// loaded. The bundle's files are cached by the worker itself (worker.js), not here.

const SHELL = `edgespec-shell-${VERSION}`;

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(SHELL).then((cache) => cache.addAll(APP_FILES)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys()
    .then((keys) => Promise.all(keys.filter((k) => k.startsWith("edgespec-shell-") && k !== SHELL).map((k) => caches.delete(k))))
    .then(() => self.clients.claim()));
});

self.addEventListener("fetch", (event) => {
  if (event.request.method !== "GET") return;
  event.respondWith(caches.open(SHELL).then(async (cache) => {
    const url = new URL(event.request.url);
    url.search = ""; // the page's ?bundle= and ?mode= do not make another file
    return (await cache.match(url.href)) ?? fetch(event.request);
  }));
});
