import { post } from "./api.js";
import { $, el, fail, nav, pagedList, show, toast, when } from "./ui.js";

const audit = pagedList({
  url: "/api/v1/admin/audit?limit=30",
  key: "entries",
  list: $("#audit tbody"),
  more: $("#audit-more"),
  item: (e) => el("tr", {},
    el("td", {}, when(e.at)), el("td", {}, e.actor ?? "(system)"), el("td", {}, e.action),
    el("td", {}, e.target ? el("a", { href: `/@${e.target}` }, `@${e.target}`) : ""), el("td", {}, e.reason ?? "")),
});

async function main() {
  const account = await nav();
  const admin = Boolean(account?.is_admin);
  show($("#not-admin"), !admin);
  show($("#admin-tools"), admin);
  if (admin) await audit();
}

$("#mod-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const action = event.submitter?.value ?? "suspend";
  const handle = $("#mod-handle").value.trim();
  const reason = $("#mod-reason").value.trim();
  $("#mod-error").textContent = "";
  if (action === "suspend" && !reason) {
    $("#mod-error").textContent = "Give a reason to suspend an account.";
    $("#mod-reason").focus();
    return;
  }
  try {
    const account = await post(`/api/v1/admin/accounts/${encodeURIComponent(handle)}/${action}`,
      reason ? { reason } : action === "suspend" ? { reason } : undefined);
    toast(`@${account.handle} is ${account.suspended ? "suspended" : "active"}`);
    await audit();
  } catch (err) {
    $("#mod-error").textContent = err.message;
  }
});

main().catch(fail);
