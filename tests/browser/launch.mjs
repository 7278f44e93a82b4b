// How the browser tests start Chromium: Debian's package (or $CHROMIUM),
// headless, with the flags that keep it from reaching out to the network
// (this machine's network is closed; without them Chromium's background
// connections fail, many at a time, and slow every start).

/** Options for playwright-core's `chromium.launch`. */
export function launchOptions() {
  return {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  };
}
