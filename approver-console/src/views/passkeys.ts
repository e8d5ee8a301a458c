// Settings › Passkeys: the signed-in reviewer's passkeys, which confirm approvals that need step-up.
import { ApiError, listPasskeys, type Passkey, removePasskey, signInOptions } from "../api.js";
import { h, replaceChildren } from "../dom.js";
import { when } from "../format.js";
import { addPasskey, passkeysSupported } from "../stepup.js";
import { alertBox, heading, type View } from "../ui.js";

function describe(error: unknown): string {
  return error instanceof ApiError ? `${error.message} (${error.code})` : String(error);
}

/** `#/settings/passkeys` */
export const passkeysView: View = (main) => {
  let closed = false;
  const list = h("ul", { class: "rows", "data-testid": "passkey-list" });
  const status = h("div", { "aria-live": "polite", "data-testid": "passkeys-status" });
  const name = h("input", { id: "passkey-name", type: "text", maxlength: 64, value: "", placeholder: "e.g. work laptop", "data-testid": "passkey-name" });
  const add = h("button", { type: "button", class: "approve", "data-testid": "add-passkey" }, "Add a passkey");

  const paint = (passkeys: readonly Passkey[]): void => {
    if (passkeys.length === 0) {
      replaceChildren(list, h("li", { class: "hint", "data-testid": "no-passkeys" }, "No passkey yet. Approvals that need step-up will ask for one."));
      return;
    }
    replaceChildren(
      list,
      passkeys.map((passkey) => {
        const remove = h("button", { type: "button", class: "link-button", "data-testid": "remove-passkey" }, "Remove");
        remove.addEventListener("click", () => {
          remove.disabled = true;
          removePasskey(passkey.id).then(refresh, (error: unknown) => {
            remove.disabled = false;
            replaceChildren(status, alertBox(describe(error), "passkey-error"));
          });
        });
        return h(
          "li",
          { class: "row", "data-testid": "passkey-row", "data-passkey-id": passkey.id },
          h("strong", {}, passkey.name),
          h("span", { class: "row-time" }, `added ${when(passkey.createdAt)}`, passkey.lastUsedAt === undefined ? ", never used" : `, last used ${when(passkey.lastUsedAt)}`),
          remove,
        );
      }),
    );
  };
  const refresh = (): void => {
    listPasskeys().then(
      (passkeys) => {
        if (!closed) paint(passkeys);
      },
      (error: unknown) => {
        if (!closed) replaceChildren(status, alertBox(describe(error), "passkey-error"));
      },
    );
  };

  add.addEventListener("click", () => {
    add.disabled = true;
    replaceChildren(status, h("p", { class: "hint" }, "Follow your browser's passkey prompt…"));
    addPasskey(name.value.trim() === "" ? "passkey" : name.value.trim()).then(
      (passkey) => {
        add.disabled = false;
        name.value = "";
        replaceChildren(status, h("p", { class: "notice", "data-testid": "passkey-added" }, `Passkey “${passkey.name}” added.`));
        refresh();
      },
      (error: unknown) => {
        add.disabled = false;
        replaceChildren(status, alertBox(describe(error), "passkey-error"));
        // Enrolling needs a recent sign-in: through the provider again (it must ask for the password), then back here.
        if (error instanceof ApiError && error.details.reason === "fresh_sign_in_required") {
          signInOptions().then(
            (options) => {
              if (closed || options.sso === undefined) return;
              replaceChildren(status, h("p", { class: "notice", "data-testid": "fresh-sign-in" }, "Adding a passkey needs a recent sign-in: taking you to your identity provider…"));
              location.assign(`${options.sso.loginUrl}?fresh=1&return=${encodeURIComponent("#/settings/passkeys")}`);
            },
            () => undefined,
          );
        }
      },
    );
  });

  replaceChildren(
    main,
    h(
      "section",
      { class: "view passkeys", "data-testid": "passkeys" },
      heading("Passkeys"),
      h(
        "p",
        { class: "hint" },
        "Some approvals need a step-up: your passkey signs a challenge made from the exact request and your verdict, so the approval proves you approved this action and nothing else.",
      ),
      passkeysSupported() ? null : alertBox("This browser cannot use passkeys here: WebAuthn needs https (or localhost).", "passkey-unsupported"),
      list,
      h("div", { class: "card" }, h("label", { for: "passkey-name" }, "Name"), name, h("div", { class: "actions" }, add)),
      status,
    ),
  );
  refresh();
  return () => {
    closed = true;
  };
};
